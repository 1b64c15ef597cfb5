// A certified OpenID provider (npm oidc-provider) on a loopback port, for
// tests/e2e/test_oidc_provider_e2e.py:  node provider.mjs KEYS_JSON [PORT]
// (a free port by default). It prints "PORT <n>" once listening.
//
// - client_credentials with resource indicators: client "svc-<ALG>" gets an
//   RFC 9068 JWT access token (typ at+jwt) signed with ALG, whose aud is the
//   resource asked for and whose scope is "chat:read chat:write".
// - client "web": the authorization code flow through the provider's own login
//   pages, for a real id_token.
// - POST /_test/keys {"keys": [{"kid", "kty", "crv"?, "alg"?}, ...]} replaces the
//   signing keys while it runs (key rotation): the provider is rebuilt on the same
//   port, and the first key that can sign an algorithm signs it. A kid named
//   again is the same key. Keys come without "alg" unless one is given, as
//   oidc-provider publishes them.
// - POST /_test/jwks {"answer": "500" | "html" | "hang" | null}: the JWKS endpoint
//   breaks (HTTP 500, an HTML page, no answer) until set back to null, while
//   discovery and the token endpoint keep working.
import { generateKeyPairSync } from 'node:crypto';
import http from 'node:http';

import Provider from 'oidc-provider';

const SECRET = 'test-client-secret-0123456789abcdef0123456789';
const ALGS = ['RS256', 'PS256', 'ES256', 'EdDSA', 'Ed25519'];
const SCOPE = 'chat:read chat:write';

const made = new Map(); // kid -> JWK: a key named again keeps its material

function makeKey(spec) {
  if (!made.has(spec.kid)) made.set(spec.kid, generate(spec));
  return made.get(spec.kid);
}

function generate({ kid, kty, crv, alg }) {
  let pair;
  if (kty === 'RSA') pair = generateKeyPairSync('rsa', { modulusLength: 2048 });
  else if (kty === 'EC') pair = generateKeyPairSync('ec', { namedCurve: crv || 'P-256' });
  else if (kty === 'OKP') pair = generateKeyPairSync('ed25519');
  else throw new Error(`unknown kty ${kty}`);
  const jwk = pair.privateKey.export({ format: 'jwk' });
  return { ...jwk, kid, use: 'sig', ...(alg ? { alg } : {}) };
}

function build(issuer, keys) {
  const clients = ALGS.map((alg) => ({
    client_id: `svc-${alg}`,
    client_secret: SECRET,
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
  }));
  clients.push({
    client_id: 'web',
    client_secret: SECRET,
    grant_types: ['authorization_code'],
    response_types: ['code'],
    redirect_uris: ['http://127.0.0.1/callback'],
  });
  const provider = new Provider(issuer, {
    clients,
    jwks: { keys },
    cookies: { keys: ['test-cookie-key-0123456789abcdef'] },
    features: {
      clientCredentials: { enabled: true },
      devInteractions: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => undefined,
        useGrantedResource: () => false,
        getResourceServerInfo: (ctx, resource, client) => ({
          scope: SCOPE,
          audience: resource,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: client.clientId.startsWith('svc-') ? client.clientId.slice(4) : 'RS256' } },
        }),
      },
    },
    enabledJWA: { idTokenSigningAlgValues: ALGS },
    scopes: ['openid', 'chat:read', 'chat:write'],
  });
  provider.on('server_error', (ctx, error) => console.error('server_error', error));
  return provider;
}

const initial = JSON.parse(process.argv[2] || '[{"kid": "rsa-1", "kty": "RSA"}]');
let provider;
let handle;
let jwksAnswer = null;

function readJSON(req, then) {
  let body = '';
  req.on('data', (chunk) => { body += chunk; });
  req.on('end', () => then(JSON.parse(body)));
}

function brokenJwks(res) {
  if (jwksAnswer === '500') res.writeHead(500, { 'content-type': 'text/plain' }).end('internal error');
  else if (jwksAnswer === 'html') res.writeHead(200, { 'content-type': 'text/html' }).end('<html><body>Maintenance</body></html>');
  // "hang": never answer
}

const server = http.createServer((req, res) => {
  if (req.method === 'POST' && req.url === '/_test/keys') {
    readJSON(req, ({ keys }) => {
      provider = build(provider.issuer, keys.map(makeKey));
      handle = provider.callback();
      res.writeHead(204).end();
    });
    return;
  }
  if (req.method === 'POST' && req.url === '/_test/jwks') {
    readJSON(req, ({ answer }) => {
      jwksAnswer = answer;
      res.writeHead(204).end();
    });
    return;
  }
  if (jwksAnswer && req.url.split('?')[0] === '/jwks') {
    brokenJwks(res);
    return;
  }
  handle(req, res);
});

server.listen(Number(process.argv[3] || 0), '127.0.0.1', () => {
  const { port } = server.address();
  provider = build(`http://127.0.0.1:${port}`, initial.map(makeKey));
  handle = provider.callback();
  console.log(`PORT ${port}`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
