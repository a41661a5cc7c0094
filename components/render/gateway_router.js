// The gateway's routing tier: an njs module (nginx's JavaScript) run inside the gateway's nginx.
// Why njs and not a router service: docs/gateway.md#routing-tier. Facts: docs/reference/njs.md.
//
// nginx does auth, the per-pod rate limit and reads the body; then `dispatch` picks the
// deployment (path prefix, else the OpenAI `model` field), checks the key's quota, picks the
// engine (session affinity with load-aware assignment), sets the vLLM `priority` of the key's
// class and hands the request back to nginx (`@engine`), which streams the answer.
// The data (models, engines, keys) comes from routes.js, rendered by nginx_conf.py.
// Written in the JavaScript subset of njs's own engine (no destructuring, no spread), which
// the official nginx image runs.
import routes from 'routes.js';

// ---------------------------------------------------------------- errors and metrics

function fail(r, status, message, type, code, param) {
    r.headersOut['Content-Type'] = 'application/json';
    const error = { message: message, type: type, param: param || null, code: code };
    r.return(status, JSON.stringify({ error: error }) + '\n');
}

function label(value) {
    return String(value).replace(/[\\"\n]/g, '_');
}

// One counter per metric name and label set; `metrics` renders them for Prometheus.
function counter(name, labels) {
    const parts = Object.keys(labels).sort().map((k) => k + '="' + label(labels[k]) + '"');
    ngx.shared.gateway_metrics.incr(name + '{' + parts.join(',') + '}', 1, 0);
}

const HELP = {
    gateway_routed_requests_total: 'Requests handed to an engine, by deployment, model, key, class and routing decision.',
    gateway_rejected_requests_total: 'Requests the gateway answered itself with an error, by status and reason.',
    gateway_quota_checks_total: 'Quota checks by outcome and mode (redis = shared by all replicas, local = per replica).',
    gateway_encoder_requests_total: 'Image requests the encoder tier encoded (or found cached) before the engine.',
    gateway_encoder_skipped_total: 'Image requests whose encoder pre-step failed and was skipped.',
    gateway_placement_fallbacks_total: 'Session placements this replica made alone: Redis (or the sidecar) did not answer.',
};

// One scrape for the routing tier and the quota sidecar (which listens on loopback only).
async function metrics(r) {
    const byName = {};
    ngx.shared.gateway_metrics.items().forEach((item) => {
        const name = item[0].slice(0, item[0].indexOf('{'));
        (byName[name] = byName[name] || []).push(item[0] + ' ' + item[1]);
    });
    let lines = [];
    Object.keys(HELP).forEach((name) => {
        lines.push('# HELP ' + name + ' ' + HELP[name], '# TYPE ' + name + ' counter');
        lines = lines.concat((byName[name] || []).sort());
    });
    let quota = '';
    if (routes.quota || routes.sharedPlacement) {
        try {
            const reply = await r.subrequest('/_quota_metrics');
            quota = reply.status === 200 ? reply.responseText : '';
        } catch (e) {
            quota = '';
        }
    }
    r.headersOut['Content-Type'] = 'text/plain; version=0.0.4';
    r.return(200, lines.join('\n') + '\n' + quota);
}

// The limit_req 429 passes here so that it is counted like every other refusal.
function rateLimited(r) {
    counter('gateway_rejected_requests_total', { status: 429, reason: 'rate_limit', key_id: r.variables.api_key_id });
    fail(r, 429, 'Rate limit reached for this API key; slow down and retry.', 'requests', 'rate_limit_exceeded');
}

// ---------------------------------------------------------------- the request

// A request body as the router sees it, without parsing it whole: a 64 MiB image body is one
// long JSON string, which the scan below jumps over natively (Buffer.indexOf), where a full
// JSON.parse would build it as a JavaScript string and value (docs/gateway.md#bodies).
// `fields` holds where each top-level field's value lies, `images` counts image_url keys at
// any depth.
const QUOTE = 0x22;
const BACKSLASH = 0x5c;
const COLON = 0x3a;
const COMMA = 0x2c;
const OPEN = [0x7b, 0x5b];
const CLOSE = [0x7d, 0x5d];

function isSpace(c) {
    return c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09;
}

function stringEnd(buf, start) {
    let i = start;
    for (;;) {
        i = buf.indexOf(QUOTE, i + 1);
        if (i < 0) {
            return -1;
        }
        let slashes = 0;
        for (let j = i - 1; buf[j] === BACKSLASH; j--) {
            slashes += 1;
        }
        if (slashes % 2 === 0) {
            return i;
        }
    }
}

function skipSpace(buf, i) {
    while (i < buf.length && isSpace(buf[i])) {
        i += 1;
    }
    return i;
}

function trimEnd(buf, start, end) {
    while (end > start && isSpace(buf[end - 1])) {
        end -= 1;
    }
    return end;
}

// {buf, fields: {name: [start, end]}, images, open} or null when the body is not a JSON
// object (what lies inside the values, vLLM validates).
function scan(buf) {
    const fields = {};
    let images = 0;
    let depth = 0;
    let current = null;
    const open = skipSpace(buf, 0);
    if (buf[open] !== OPEN[0]) {
        return null;
    }
    for (let i = open; i < buf.length; i++) {
        const c = buf[i];
        if (c === QUOTE) {
            const end = stringEnd(buf, i);
            if (end < 0) {
                return null;
            }
            const next = skipSpace(buf, end + 1);
            if (buf[next] === COLON) {
                const name = JSON.parse(buf.slice(i, end + 1).toString());
                images += name === 'image_url' ? 1 : 0;
                if (depth === 1) {
                    current = name;
                    fields[name] = [skipSpace(buf, next + 1), -1];
                }
                i = next;
            } else {
                i = end;
            }
        } else if (OPEN.indexOf(c) >= 0) {
            depth += 1;
        } else if (CLOSE.indexOf(c) >= 0) {
            depth -= 1;
            if (depth === 0) {
                if (current !== null) {
                    fields[current][1] = trimEnd(buf, fields[current][0], i);
                }
                const rest = skipSpace(buf, i + 1);
                return rest === buf.length ? { buf: buf, fields: fields, images: images, open: open } : null;
            }
        } else if (c === COMMA && depth === 1 && current !== null) {
            fields[current][1] = trimEnd(buf, fields[current][0], i);
            current = null;
        }
    }
    return null;
}

function parseBody(r) {
    const buf = r.requestBuffer;
    if (!buf || !buf.length) {
        return { buf: Buffer.alloc(0), fields: {}, images: 0, open: 0 };
    }
    return scan(buf);
}

// One top-level field's value (undefined when absent or not JSON).
function field(request, name) {
    const span = request.fields[name];
    if (!span || span[1] < 0) {
        return undefined;
    }
    try {
        return JSON.parse(request.buf.slice(span[0], span[1]).toString());
    } catch (e) {
        return undefined;
    }
}

// The body with top-level fields set to `values` (replaced where present, else added first),
// every other byte copied as it came.
function withFields(request, values) {
    const buf = request.buf;
    const spans = [];
    let added = '';
    Object.keys(values).forEach((name) => {
        const span = request.fields[name];
        const json = JSON.stringify(values[name]);
        if (span && span[1] >= 0) {
            spans.push([span[0], span[1], json]);
        } else {
            added += JSON.stringify(name) + ':' + json + ',';
        }
    });
    spans.sort((a, b) => a[0] - b[0]);
    if (Object.keys(request.fields).length === 0) {
        added = added.slice(0, -1);
    }
    const parts = [buf.slice(0, request.open + 1), Buffer.from(added)];
    let at = request.open + 1;
    spans.forEach((span) => {
        parts.push(buf.slice(at, span[0]), Buffer.from(span[2]));
        at = span[1];
    });
    parts.push(buf.slice(at));
    return Buffer.concat(parts);
}

// `/<deployment>/v1/...` names its deployment (the compatibility routes); `/v1/...` and
// `/chat/completions` leave it to the body's `model`.
function pathDeployment(r) {
    const match = r.uri.match(/^\/([^/]+)\/v1\//);
    return match && routes.deployments[match[1]] ? match[1] : null;
}

function upstreamUri(r) {
    const path = r.uri === '/chat/completions' ? '/v1/chat/completions' : r.uri.replace(/^\/[^/]+(\/v1\/)/, '$1');
    return path + (r.variables.args ? '?' + r.variables.args : '');
}

// ---------------------------------------------------------------- quotas

// Asks the quota sidecar (Redis, shared by all replicas; per replica when Redis is down).
// Returns true when the request may go on; answers the 429 itself otherwise.
async function withinQuota(r, key) {
    if (!routes.keys[key] || !routes.keys[key].rpm) {
        return true;
    }
    let reply;
    try {
        reply = await r.subrequest('/_quota', { args: 'key=' + key, method: 'GET' });
    } catch (e) {
        reply = { status: 502, headersOut: {} };
    }
    const mode = reply.headersOut['X-Quota-Mode'] || 'unavailable';
    if (reply.status === 429) {
        counter('gateway_quota_checks_total', { outcome: 'refused', mode: mode, key_id: key });
        counter('gateway_rejected_requests_total', { status: 429, reason: 'quota', key_id: key });
        r.headersOut['Retry-After'] = reply.headersOut['Retry-After'] || '60';
        fail(r, 429, 'Requests-per-minute quota of this API key (' + routes.keys[key].rpm +
            ') reached; retry after the Retry-After seconds.', 'requests', 'rate_limit_exceeded');
        return false;
    }
    if (reply.status !== 204) {
        // The sidecar itself is gone: keep serving (the per-pod limit_req still holds) and say so.
        r.warn('quota check failed with status ' + reply.status + ': request let through');
    }
    counter('gateway_quota_checks_total', { outcome: reply.status === 204 ? 'allowed' : 'unchecked', mode: mode, key_id: key });
    return true;
}

// ---------------------------------------------------------------- engines

const PLACEMENT_PATH = '/_placement';
// After Redis failed to answer, a session's next request past this many seconds asks again.
const PLACEMENT_RETRY_SECONDS = 5;

function sessionKey(r, request) {
    const header = r.headersIn[routes.affinityHeader];
    const value = field(request, 'user');
    const user = typeof value === 'string' ? value : '';
    return header || user || '';
}

function now() {
    return Date.now() / 1000;
}

function inflight(upstream) {
    return ngx.shared.gateway_engines.get('inflight:' + upstream) || 0;
}

function sessionCount(upstream) {
    return ngx.shared.gateway_engines.get('sessions:' + upstream) || 0;
}

// Healthy: its last /health probe answered (or none ran yet) and no request failed on it lately.
function healthy(upstream) {
    const probed = ngx.shared.gateway_engines.get('up:' + upstream);
    return probed !== 0 && (ngx.shared.gateway_engines.get('down_until:' + upstream) || 0) <= now();
}

// An engine is overloaded when its open requests exceed the bound over the deployment's mean
// (bounded-load, as in consistent hashing with bounded loads): then its sessions move.
function overloaded(upstream, engines) {
    const total = engines.reduce((sum, e) => sum + inflight(e), 0);
    const bound = Math.ceil(routes.loadBound * (total + 1) / engines.length);
    return inflight(upstream) > bound;
}

function leastLoaded(engines) {
    const candidates = engines.filter(healthy);
    const pool = candidates.length ? candidates : engines;
    return pool.reduce((best, e) => {
        const a = [sessionCount(e), inflight(e)];
        const b = [sessionCount(best), inflight(best)];
        return a[0] < b[0] || (a[0] === b[0] && a[1] < b[1]) ? e : best;
    });
}

function usable(upstream, engines) {
    return engines.indexOf(upstream) >= 0 && healthy(upstream) && !overloaded(upstream, engines);
}

// This replica's memory of a session: [engine, when Redis last confirmed it] or null.
function remembered(id) {
    const value = ngx.shared.gateway_sessions.get(id);
    if (!value) {
        return null;
    }
    const parts = value.split(' ');
    return [parts[0], Number(parts[1]) || 0];
}

function remember(id, known, upstream, confirmed) {
    if (known && known[0] !== upstream) {
        ngx.shared.gateway_engines.incr('sessions:' + known[0], -1, 1);
    }
    if (!known || known[0] !== upstream) {
        ngx.shared.gateway_engines.incr('sessions:' + upstream, 1, 0);
    }
    ngx.shared.gateway_sessions.set(id, upstream + ' ' + confirmed); // also renews the idle timeout
}

// The engine Redis holds for the session after `op` (the sidecar's claim / touch / move from
// `from`, docs/gateway.md#shared-placement), or null when Redis or the sidecar cannot answer.
async function sharedEngine(r, op, deployment, session, upstream, from) {
    const args = 'op=' + op + '&ttl=' + routes.sessionTtl + '&engine=' + encodeURIComponent(upstream) +
        '&from=' + encodeURIComponent(from || '') + '&key=' + encodeURIComponent(deployment + ':' + session);
    let reply;
    try {
        reply = await r.subrequest(PLACEMENT_PATH, { args: args, method: 'GET' });
    } catch (e) {
        reply = { status: 502, headersOut: {} };
    }
    const held = reply.status === 204 ? reply.headersOut['X-Placement'] : null;
    if (!held) {
        counter('gateway_placement_fallbacks_total', { deployment: deployment, op: op });
    }
    return held || null;
}

// When this replica asks Redis again: after half the TTL, or soon after Redis failed to answer.
function confirmedAt(held) {
    return held ? now() : now() - routes.sessionTtl / 2 + PLACEMENT_RETRY_SECONDS;
}

// Least-loaded assignment remembered per session: a session keeps its engine while that
// engine is healthy and not overloaded; a new (or moved) session goes to the engine with
// the fewest sessions. With several replicas the placement is shared through Redis, asked
// only for a session this replica has not seen (or not confirmed for half the TTL), so the
// usual request costs no round trip. Returns [upstream, decision].
async function affinity(r, deployment, session) {
    const engines = routes.deployments[deployment].engines;
    const id = deployment + '|' + session;
    const known = remembered(id);
    const shared = routes.sharedPlacement;
    const fresh = known && (!shared || now() - known[1] < routes.sessionTtl / 2);
    if (fresh && usable(known[0], engines)) {
        remember(id, known, known[0], known[1]);
        return [known[0], 'sticky'];
    }
    let current = known ? known[0] : null;
    let counted = known;
    let decision = known ? 'sticky' : 'new_session';
    let confirmed = known ? known[1] : 0;
    if (shared && !(known && !usable(known[0], engines))) {
        // Unseen here, or due for a refresh: another replica may have placed (or moved) it.
        const candidate = current || leastLoaded(engines);
        if (!known) {
            // Counted before the wait: new sessions arriving meanwhile must not all pick it.
            ngx.shared.gateway_engines.incr('sessions:' + candidate, 1, 0);
            counted = [candidate, 0];
        }
        const held = await sharedEngine(r, known ? 'touch' : 'claim', deployment, session, candidate);
        confirmed = confirmedAt(held);
        current = held || candidate;
        decision = !known && held && held !== candidate ? 'shared' : decision;
    }
    if (current && usable(current, engines)) {
        remember(id, counted, current, confirmed);
        return [current, decision];
    }
    const others = engines.filter((e) => e !== current);
    let chosen = leastLoaded(others.length ? others : engines);
    let held = null;
    if (shared) {
        // Another replica may have moved it first (it saw the same failure): theirs then.
        held = await sharedEngine(r, 'move', deployment, session, chosen, current);
        chosen = held && held !== current && usable(held, engines) ? held : chosen;
    }
    remember(id, counted, chosen, shared ? confirmedAt(held) : 0);
    return [chosen, current ? 'moved' : 'new_session'];
}

// Every engine's /health (vLLM answers 200 once it serves), all at once: a group that is gone
// (a name that no longer resolves, KEDA below maxReplicas) or not ready takes no new session,
// and its sessions move, before any request has to fail on it.
async function probe() {
    const checks = [];
    Object.keys(routes.deployments).forEach((d) => {
        const target = routes.deployments[d];
        target.engines.forEach((upstream, i) => {
            const url = 'http://' + target.engineAddresses[i] + '/health';
            checks.push(ngx.fetch(url).then(
                (reply) => ngx.shared.gateway_engines.set('up:' + upstream, reply.status === 200 ? 1 : 0),
                () => ngx.shared.gateway_engines.set('up:' + upstream, 0)
            ));
        });
    });
    await Promise.all(checks);
}

// Session counts drift when idle sessions expire from the dictionary: recount them.
function recount() {
    const counts = {};
    ngx.shared.gateway_sessions.items().forEach((item) => {
        const upstream = item[1].split(' ')[0];
        counts[upstream] = (counts[upstream] || 0) + 1;
    });
    Object.keys(routes.deployments).forEach((d) => {
        routes.deployments[d].engines.forEach((e) => {
            ngx.shared.gateway_engines.set('sessions:' + e, counts[e] || 0);
        });
    });
}

// Log phase (a js_set variable in the access log): the request is over.
function finished(r) {
    const upstream = r.variables.route_upstream;
    if (upstream && upstream.indexOf('engine-') === 0 && r.variables.route_engine === '1') {
        ngx.shared.gateway_engines.incr('inflight:' + upstream, -1, 1);
        const status = String(r.variables.upstream_status || '');
        if (/^(502|504)|, /.test(status)) {
            // The chosen engine failed (or nginx moved on to a backup): new work avoids it for a while.
            ngx.shared.gateway_engines.set('down_until:' + upstream, now() + routes.failTimeout);
        }
    }
    return upstream || '';
}

// ---------------------------------------------------------------- the encoder pre-step

// The vision tier's encoder step (docs/vision.md#proxy-step): a 1-token copy of an image
// request goes to the deployment's encoder tier under the request's own id, so the encoder
// writes each image's output to the shared cache before the engine looks for it. nginx's
// /_encoder/ location bounds each attempt (vision.timeoutSeconds) and retries another encoder
// (vision.retries). It never fails the request: without the file the engine encodes locally.
async function encoderPreStep(r, route, request) {
    if (!route.encoder) {
        return;
    }
    const values = { max_tokens: 1, stream: false };
    if (request.fields.max_completion_tokens) {
        values.max_completion_tokens = 1;
    }
    if (request.fields.stream_options) {
        values.stream_options = null;
    }
    if (request.fields.priority) {
        values.priority = 0; // encoders run first-come-first-served: only 0 is accepted there
    }
    let ok = false;
    try {
        const reply = await r.subrequest('/_encoder/' + route.deployment + route.uri.split('?')[0], {
            method: 'POST', args: 'rid=' + r.variables.request_id, body: withFields(request, values),
        });
        ok = reply.status === 200;
    } catch (e) {
        ok = false;
    }
    counter(ok ? 'gateway_encoder_requests_total' : 'gateway_encoder_skipped_total', { deployment: route.deployment });
}

// ---------------------------------------------------------------- handlers

function deploymentOf(r, request) {
    const byPath = pathDeployment(r);
    if (byPath) {
        return [byPath, 'path'];
    }
    if (!request.fields.model) {
        // Clients of the seed's single-model /v1 send no model (vLLM does not require one).
        return [routes.defaultDeployment, 'default'];
    }
    const model = String(field(request, 'model'));
    const known = Object.prototype.hasOwnProperty.call(routes.models, model);
    return known ? [routes.models[model], 'model'] : [null, model];
}

function forward(r, route, rewritten) {
    r.variables.route_upstream = route.upstream;
    r.variables.route_uri = route.uri;
    r.variables.route_engine = route.engine ? '1' : '0';
    r.variables.deployment = route.deployment;
    if (route.engine) {
        ngx.shared.gateway_engines.incr('inflight:' + route.upstream, 1, 0);
    }
    if (rewritten) {
        r.rawVariables.route_body = rewritten;
        r.internalRedirect('@engine_rewritten');
    } else {
        r.internalRedirect('@engine');
    }
}

async function dispatch(r) {
    const key = r.variables.api_key_id;
    const request = parseBody(r);
    if (request === null) {
        counter('gateway_rejected_requests_total', { status: 400, reason: 'invalid_json', key_id: key });
        fail(r, 400, 'The request body is not a JSON object.', 'invalid_request_error', 'invalid_json');
        return;
    }
    const found = deploymentOf(r, request);
    const deployment = found[0];
    const how = found[1];
    if (!deployment) {
        counter('gateway_rejected_requests_total', { status: 404, reason: 'model_not_found', key_id: key });
        fail(r, 404, 'The model `' + String(how).slice(0, 200) + '` does not exist or you do not have ' +
            'access to it. GET /v1/models lists the models this gateway serves.',
            'invalid_request_error', 'model_not_found', 'model');
        return;
    }
    const target = routes.deployments[deployment];
    const images = request.images;
    if (target.maxImages !== null && images > target.maxImages) {
        counter('gateway_rejected_requests_total', { status: 400, reason: 'too_many_images', key_id: key });
        fail(r, 400, 'At most ' + target.maxImages + ' images per request for model `' + deployment +
            '`; this request has ' + images + '.', 'invalid_request_error', 'too_many_images', 'messages');
        return;
    }
    if (!(await withinQuota(r, key))) {
        return;
    }
    const keyClass = (routes.keys[key] || {}).class || routes.defaultClass;
    const session = routes.affinity && r.method === 'POST' ? sessionKey(r, request) : '';
    const pick = session ? await affinity(r, deployment, session) : [target.upstream, 'least_conn'];
    const upstream = pick[0];
    const decision = pick[1];
    const route = {
        deployment: deployment, upstream: upstream, uri: upstreamUri(r),
        engine: upstream !== target.upstream, encoder: target.encoder, images: images,
    };
    counter('gateway_routed_requests_total', {
        deployment: deployment, model: how === 'model' ? field(request, 'model') : deployment,
        key_id: key, class: keyClass, route: how, decision: decision,
    });
    if (images) {
        await encoderPreStep(r, route, request);
    }
    // The class decides the vLLM priority (lower = earlier); whatever the client sent is replaced.
    const rewrite = target.priority && r.method === 'POST' && request.buf.length;
    forward(r, route, rewrite ? withFields(request, { priority: routes.classes[keyClass] }) : null);
}

function modelObject(name) {
    return {
        id: name, object: 'model', created: routes.created, owned_by: 'qwen-vl-serving',
        root: routes.deployments[routes.models[name]].model, parent: null,
    };
}

// GET /v1/models: the union of every deployment's names (served name first, then aliases),
// in the OpenAI list shape; GET /v1/models/<name>: one of them. Answered without an engine.
function models(r) {
    const name = decodeURIComponent(r.uri.slice('/v1/models/'.length));
    if (r.uri.indexOf('/v1/models/') === 0 && name) {
        if (!Object.prototype.hasOwnProperty.call(routes.models, name)) {
            fail(r, 404, 'The model `' + name.slice(0, 200) + '` does not exist.',
                'invalid_request_error', 'model_not_found', 'model');
            return;
        }
        r.headersOut['Content-Type'] = 'application/json';
        r.return(200, JSON.stringify(modelObject(name)) + '\n');
        return;
    }
    const data = Object.keys(routes.models).map(modelObject);
    r.headersOut['Content-Type'] = 'application/json';
    r.return(200, JSON.stringify({ object: 'list', data: data }) + '\n');
}

export default { dispatch, models, metrics, rateLimited, finished, recount, probe };
