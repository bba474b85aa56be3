// A real authorization server for the identity tests: oidc-provider (OpenID Certified), run
// as its own process on the port the test chose. Configured by one JSON argument:
//   {port, clients: [{client_id, client_secret, grant_types, scope, redirect_uris}],
//    resources: {"<uri>": {scope, ttl}}, default_resource, exchange_ttl}
// It serves OIDC discovery and JWKS, issues JWT access tokens (RFC 9068) for resource
// indicators (RFC 8707) by client credentials, and takes RFC 8693 token exchange, a grant the
// provider does not ship and a deployment registers (Keycloak, Okta and Entra ID each have
// one): the subject token must be a live token this server issued; the new token names the
// same subject, the exchanging client as `act.sub` (nesting the subject's own `act`), one
// resource, and scopes narrowed to the resource's, the client's and the subject's.
// GET /_test/stats answers how many tokens each grant issued, so a test can see a cache work.
import http from "node:http";
import * as crypto from "node:crypto";
import Provider, { errors } from "oidc-provider";
import * as jose from "jose";

const settings = JSON.parse(process.argv[2]);
const issuer = `http://127.0.0.1:${settings.port}`;
const EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token";
const JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt";
const stats = { client_credentials: 0, authorization_code: 0, [EXCHANGE]: 0, refused: 0, registered: 0 };

const { privateKey } = crypto.generateKeyPairSync("rsa", { modulusLength: 2048 });
const signing = { ...privateKey.export({ format: "jwk" }), kid: "test-rs256", use: "sig", alg: "RS256" };
const publicJwks = jose.createLocalJWKSet({
  keys: [{ kty: signing.kty, n: signing.n, e: signing.e, kid: signing.kid, alg: "RS256", use: "sig" }],
});

const resourceInfo = (uri) => {
  const info = settings.resources[uri];
  if (!info) throw new errors.InvalidTarget(`unknown resource ${uri}`);
  return {
    scope: info.scope,
    audience: uri,
    accessTokenTTL: info.ttl ?? 300,
    accessTokenFormat: "jwt",
    jwt: { sign: { alg: "RS256" } },
  };
};

const provider = new Provider(issuer, {
  clients: settings.clients.map((c) => ({
    client_id: c.client_id,
    client_secret: c.client_secret,
    grant_types: c.grant_types,
    scope: c.scope,
    redirect_uris: c.redirect_uris ?? [],
    response_types: c.redirect_uris?.length ? ["code"] : [],
    token_endpoint_auth_method: "client_secret_basic",
  })),
  jwks: { keys: [signing] },
  scopes: [...new Set(Object.values(settings.resources).flatMap((r) => r.scope.split(" ")))],
  features: {
    // The provider's own sign-in pages: any user name signs in (users are the tests').
    devInteractions: { enabled: true },
    clientCredentials: { enabled: true },
    // Dynamic client registration (RFC 7591), as MCP clients expect of an authorization
    // server they discover: open to any client, as a test server may be.
    registration: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => settings.default_resource,
      getResourceServerInfo: (ctx, uri) => resourceInfo(uri),
      useGrantedResource: () => true,
    },
  },
  // A client that registers itself may later ask for any scope the server has (consent
  // decides), as MCP clients that step up need: this test server's registration policy.
  extraClientMetadata: {
    properties: ["x_registered_by_test"],
    validator(ctx, key, value, metadata) {
      if (ctx?.oidc?.route === "registration") delete metadata.scope;
    },
  },
  formats: {
    customizers: {
      // An exchanged token names the subject and the actor chain, as RFC 8693 §4.1 says.
      jwt: (ctx, token, jwt) => {
        const exchanged = ctx?.oidc?.exchanged;
        if (exchanged) {
          jwt.payload.sub = exchanged.sub;
          jwt.payload.act = exchanged.act;
        }
      },
    },
  },
  ttl: { ClientCredentials: (ctx, token) => token.resourceServer?.accessTokenTTL ?? 300 },
});

const scopesOf = (value) => new Set(typeof value === "string" && value ? value.split(" ") : []);

async function tokenExchange(ctx) {
  const { params, client } = ctx.oidc;
  if (![ACCESS_TOKEN, JWT_TYPE].includes(params.subject_token_type)) {
    throw new errors.InvalidRequest("subject_token_type must be an access token or a JWT");
  }
  let subject;
  try {
    ({ payload: subject } = await jose.jwtVerify(params.subject_token, publicJwks, { issuer }));
  } catch (err) {
    throw new errors.InvalidGrant(`subject_token is not valid: ${err.code ?? err.message}`);
  }
  const target = params.resource ?? params.audience;
  if (typeof target !== "string" || !settings.resources[target]) {
    throw new errors.InvalidTarget("exactly one known resource or audience is required");
  }
  const resourceServer = new provider.ResourceServer(target, resourceInfo(target));
  const allowed = scopesOf(resourceServer.scope);
  const clientScopes = scopesOf(client.scope);
  const subjectScopes = scopesOf(subject.scope);
  const asked = params.scope ? scopesOf(params.scope) : subjectScopes;
  const granted = [...asked].filter((s) => allowed.has(s) && clientScopes.has(s) && subjectScopes.has(s));
  const token = new provider.ClientCredentials({ client, scope: granted.join(" ") || undefined });
  token.resourceServer = resourceServer;
  const act = { sub: client.clientId };
  if (subject.act) act.act = subject.act;
  ctx.oidc.exchanged = { sub: subject.sub, act };
  const value = await token.save();
  stats[EXCHANGE] += 1;
  ctx.body = {
    access_token: value,
    issued_token_type: ACCESS_TOKEN,
    token_type: "Bearer",
    expires_in: token.expiration,
    scope: token.scope,
  };
}

provider.registerGrantType(EXCHANGE, tokenExchange, [
  "subject_token",
  "subject_token_type",
  "actor_token",
  "actor_token_type",
  "audience",
  "resource",
  "scope",
  "requested_token_type",
]);
provider.on("grant.success", (ctx) => {
  const grant = ctx.oidc.params.grant_type;
  if (grant === "client_credentials" || grant === "authorization_code") stats[grant] += 1;
});
provider.on("registration_create.success", () => {
  stats.registered += 1;
});
provider.on("grant.error", () => {
  stats.refused += 1;
});

const app = provider.callback();
const server = http.createServer((req, res) => {
  if (req.url === "/_test/stats") {
    res.setHeader("content-type", "application/json");
    res.end(JSON.stringify(stats));
    return;
  }
  app(req, res);
});
server.listen(settings.port, "127.0.0.1", () => console.log(JSON.stringify({ issuer })));
