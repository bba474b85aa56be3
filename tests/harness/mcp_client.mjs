// The official MCP TypeScript SDK's client, with its OAuth flow (client credentials), as an
// MCP client in front of which the tests put the proxy. One JSON argument:
//   {url, client_id, client_secret, scope, issuer, calls: [{name, arguments}]}
// It connects (the SDK discovers the protected resource metadata and the authorization
// server, gets a token for the resource, steps up on insufficient_scope), lists the tools,
// makes each call, and prints one JSON line: {tools, results: [{ok, text}|{ok, error}], scope}.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { ClientCredentialsProvider } from "@modelcontextprotocol/sdk/client/auth-extensions.js";

const settings = JSON.parse(process.argv[2]);
const provider = new ClientCredentialsProvider({
  clientId: settings.client_id,
  clientSecret: settings.client_secret,
  scope: settings.scope,
  expectedIssuer: settings.issuer,
});
const transport = new StreamableHTTPClientTransport(new URL(settings.url), { authProvider: provider });
const client = new Client({ name: "agentproxy-tests", version: "1.0.0" });
const out = { results: [] };
try {
  await client.connect(transport);
  out.tools = (await client.listTools()).tools.map((t) => t.name).sort();
  for (const call of settings.calls) {
    try {
      const result = await client.callTool({ name: call.name, arguments: call.arguments });
      out.results.push({ ok: !result.isError, text: result.content.map((c) => c.text ?? "").join(" ") });
    } catch (err) {
      out.results.push({ ok: false, error: String(err?.message ?? err), code: err?.code ?? null });
    }
  }
} catch (err) {
  out.error = String(err?.message ?? err);
} finally {
  out.scope = provider.tokens()?.scope ?? null;
  await client.close().catch(() => {});
}
console.log(JSON.stringify(out));
