// The official MCP TypeScript SDK's client, with its OAuth flows, as the MCP client in front
// of which the tests put the proxy. One JSON argument:
//   {url, flow: "client_credentials" | "authorization_code", client_id, client_secret, scope,
//    issuer, user, calls: [{name, arguments}]}
// client_credentials: the SDK's ClientCredentialsProvider. authorization_code: what Claude
// Code, VS Code and Cursor do, with a person: the SDK discovers the protected resource
// metadata and the authorization server, registers a client there (RFC 7591), and sends the
// person to sign in; here `user` signs in on the server's own pages (fetch in place of a
// browser) and the SDK redeems the code (PKCE, RFC 8707 resource). A call answered
// insufficient_scope makes the SDK ask the person again, for the challenged scope.
// It connects, lists the tools, makes each call, and prints one JSON line:
//   {tools, results: [{ok, text} | {ok, error, code}], scope, sign_ins}.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { ClientCredentialsProvider } from "@modelcontextprotocol/sdk/client/auth-extensions.js";
import { UnauthorizedError } from "@modelcontextprotocol/sdk/client/auth.js";

const settings = JSON.parse(process.argv[2]);
const REDIRECT = "http://127.0.0.1:9/callback";

class SignInProvider {
  // An OAuthClientProvider whose "browser" is fetch on the authorization server's pages.
  constructor(user) {
    this.user = user;
    this.signIns = 0;
  }
  get redirectUrl() {
    return REDIRECT;
  }
  get clientMetadata() {
    return {
      client_name: "agentproxy-tests",
      redirect_uris: [REDIRECT],
      grant_types: ["authorization_code"],
      response_types: ["code"],
      token_endpoint_auth_method: "none",
    };
  }
  clientInformation() {
    return this.client;
  }
  saveClientInformation(info) {
    this.client = info;
  }
  tokens() {
    return this.savedTokens;
  }
  saveTokens(tokens) {
    this.savedTokens = tokens;
  }
  saveCodeVerifier(verifier) {
    this.verifier = verifier;
  }
  codeVerifier() {
    return this.verifier;
  }
  async redirectToAuthorization(url) {
    this.signIns += 1;
    this.code = await signIn(url, this.user);
  }
}

async function signIn(url, user) {
  const cookies = new Map();
  const step = async (target, init = {}) => {
    const headers = { ...(init.headers ?? {}), cookie: [...cookies].map(([k, v]) => `${k}=${v}`).join("; ") };
    const response = await fetch(target, { ...init, headers, redirect: "manual" });
    for (const line of response.headers.getSetCookie()) {
      const [pair] = line.split(";");
      const at = pair.indexOf("=");
      cookies.set(pair.slice(0, at), pair.slice(at + 1));
    }
    if (![302, 303].includes(response.status)) {
      throw new Error(`sign-in step ${target} answered ${response.status}: ${await response.text()}`);
    }
    return new URL(response.headers.get("location"), target).href;
  };
  let location = await step(url.href);
  for (const prompt of ["login", "consent"]) {
    if (!location.includes("/interaction/")) break;
    const form = new URLSearchParams({ prompt, login: user, password: "any" });
    const resume = await step(location, {
      method: "POST",
      body: form,
      headers: { "content-type": "application/x-www-form-urlencoded" },
    });
    location = await step(resume);
  }
  const code = location.startsWith(REDIRECT) ? new URL(location).searchParams.get("code") : null;
  if (!code) throw new Error(`sign-in ended at ${location}`);
  return code;
}

const provider =
  settings.flow === "authorization_code"
    ? new SignInProvider(settings.user)
    : new ClientCredentialsProvider({
        clientId: settings.client_id,
        clientSecret: settings.client_secret,
        scope: settings.scope,
        expectedIssuer: settings.issuer,
      });

let transport;
let client;
async function connect() {
  transport = new StreamableHTTPClientTransport(new URL(settings.url), { authProvider: provider });
  client = new Client({ name: "agentproxy-tests", version: "1.0.0" });
  await client.connect(transport);
}

// An interactive client signs the person in when the SDK says so, then tries again.
async function signedIn(action) {
  try {
    return await action();
  } catch (err) {
    if (!(err instanceof UnauthorizedError) || provider.code === undefined) throw err;
    const code = provider.code;
    provider.code = undefined;
    await transport.finishAuth(code);
    return await action();
  }
}

const out = { results: [] };
try {
  await signedIn(connect);
  out.tools = (await client.listTools()).tools.map((t) => t.name).sort();
  for (const call of settings.calls) {
    try {
      const result = await signedIn(() => client.callTool({ name: call.name, arguments: call.arguments }));
      out.results.push({ ok: !result.isError, text: result.content.map((c) => c.text ?? "").join(" ") });
    } catch (err) {
      out.results.push({ ok: false, error: String(err?.message ?? err), code: err?.code ?? null });
    }
  }
} catch (err) {
  out.error = String(err?.stack ?? err);
} finally {
  out.scope = provider.tokens()?.scope ?? null;
  out.sign_ins = provider.signIns ?? 0;
  await client?.close().catch(() => {});
}
console.log(JSON.stringify(out));
