#!/usr/bin/env node
// An example work-sidecar sandbox in Node.js: plain @grpc/grpc-js, with the .proto loaded at run time by
// @grpc/proto-loader (no generated code). It does what every sandbox does:
//
//   WatchWork(max_in_flight) -> on WorkAssigned: KeepAlive pings {work_id, lease_token} every few seconds,
//   "work" (GetWork + UpdateWorkMetadata to show the API), then StopWork(force=true).
//   StopRequested finishes an item early; LeaseLost abandons it at once (no StopWork: it is not ours any more);
//   Draining means no new work will come.
//   The sidecar may restart under running items (a crash, a container update): while it cannot be reached
//   (UNAVAILABLE), the watch, the KeepAlive stream and StopWork reconnect with backoff, and the new watch
//   resumes the items still held (WatchWorkRequest.resume): a sidecar restarted with its --state-dir carries on.
//   Fencing: while the sidecar cannot be reached nobody may be renewing the lease, so an item is given up a
//   fencing margin before its lease's last known expiry (from WorkAssigned, then each KeepAlive answer): it is
//   then abandoned like on LeaseLost (no StopWork), unless a KeepAlive answer came back before.
//
//   node sandbox.js unix:///tmp/work-sidecar.sock [--once] [--max-in-flight 2] [--work-seconds 2]
//   WORK_SIDECAR_ADDR=127.0.0.1:50051 node sandbox.js        (WORK_SIDECAR_ADDRESS is accepted as an alias)
'use strict';

const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const PROTO_FILE = 'sidecar/work/v1/work_service.proto';

/** Loads sidecar.work.v1 from the .proto at run time. */
function loadApi() {
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as in the .proto: work_id, lease_token, ...
    longs: String,
    enums: String, // enum values by name: 'LEASE_STATE_ACTIVE', ...
    defaults: true,
    oneofs: true, // WatchWorkResponse.event names the field that is set
  });
  return grpc.loadPackageDefinition(definition).sidecar.work.v1;
}

function say(text) {
  process.stdout.write(`[sandbox] ${text}\n`);
}

function time(timestamp) {
  if (!timestamp || !timestamp.seconds) return '-';
  return new Date(Number(timestamp.seconds) * 1000).toISOString().slice(11, 19);
}

/** UNAVAILABLE from the transport (the sidecar is down or restarting), not an answer of the sidecar's. */
function unreachable(error) {
  if (!error || error.code !== grpc.status.UNAVAILABLE) return false;
  return !(error.metadata && error.metadata.get('grpc-status-details-bin').length > 0);
}

/** Backoff with jitter before reconnect attempt `n` (1, 2, ...): 0.1 s doubling to 2 s. */
function backoffMs(n) {
  const ceiling = Math.min(2000, 100 * 2 ** (n - 1));
  return ceiling / 2 + (Math.random() * ceiling) / 2;
}

const RECONNECT_MS = 60_000; // give up on an unreachable sidecar after this long

// The fencing rule of sidecar/_fencing.py (keep the constants in step): the margin is max(1.5 s, 10 % of the
// TTL), never more than half the TTL; an item is given up that margin before its lease's last known expiry.
const FENCE_MARGIN_MIN = 1.5;
const FENCE_MARGIN_RATIO = 0.1;

function fenceMarginSeconds(ttlSeconds) {
  return Math.min(Math.max(FENCE_MARGIN_MIN, ttlSeconds * FENCE_MARGIN_RATIO), ttlSeconds / 2);
}

/** Wall-clock ms at which to give up an item whose lease status is `lease`: now if its expiry is not known. */
function fenceAtMs(lease) {
  const expires = lease && lease.expires_at;
  if (!expires || (!Number(expires.seconds) && !expires.nanos)) return Date.now();
  const expiresMs = Number(expires.seconds) * 1000 + Math.floor((expires.nanos || 0) / 1e6);
  return expiresMs - fenceMarginSeconds(Number(lease.ttl_seconds)) * 1000;
}

/**
 * Promisifies a unary call of the client; retried with backoff while the sidecar cannot be reached.
 * `signal` (the item's fence) gives up at once, also mid-call; `onUnreachable` is told of each unreachable try.
 */
async function unary(client, method, request, { signal, onUnreachable } = {}) {
  const started = Date.now();
  for (let attempt = 1; ; attempt += 1) {
    if (signal && signal.aborted) throw new Error(`${method} given up: ${signal.reason.message}`);
    try {
      return await new Promise((resolve, reject) => {
        const call = client[method](request, (error, response) => {
          if (signal) signal.removeEventListener('abort', cancel);
          if (error) reject(error);
          else resolve(response);
        });
        function cancel() {
          call.cancel();
        }
        if (signal) signal.addEventListener('abort', cancel, { once: true });
      });
    } catch (error) {
      if (signal && signal.aborted) throw new Error(`${method} given up: ${signal.reason.message}`);
      if (!unreachable(error) || Date.now() - started > RECONNECT_MS) throw error;
      if (onUnreachable) onUnreachable();
      await pause(backoffMs(attempt), signal);
    }
  }
}

/** Resolves after `ms`, or as soon as `signal` (if any) aborts. */
function pause(ms, signal) {
  return new Promise((resolve) => {
    if (signal && signal.aborted) return resolve();
    const timer = setTimeout(done, ms);
    if (signal) signal.addEventListener('abort', done, { once: true });
    function done() {
      clearTimeout(timer);
      if (signal) signal.removeEventListener('abort', done);
      resolve();
    }
  });
}

/**
 * One assigned item: keep its lease alive, work, stop it. `item.finish` (an AbortController) is aborted by
 * StopRequested / LeaseLost / the fence; `item.lost` says the lease is gone; `item.fenced` (an AbortController) is
 * aborted when the item is given up because the sidecar could not be reached before the lease would expire.
 */
async function workOn(client, assigned, item, options) {
  const work = assigned.work;
  const token = assigned.lease_token;
  let lease = assigned.lease; // the latest lease status: from WorkAssigned, then from each KeepAlive answer

  // The fence: armed while the sidecar cannot be reached, disarmed by the next KeepAlive answer. When it fires
  // nobody may have renewed the lease since its last known expiry was heard: the item is abandoned, not stopped.
  let fenceTimer = null;
  let retired = false; // stopped or abandoned: the fence is not armed any more
  const fence = () => {
    fenceTimer = null;
    if (item.lost || item.fenced.signal.aborted) return;
    item.lost = true;
    say(`fenced ${work.id}: the sidecar could not be reached before the lease would expire`);
    item.fenced.abort(new Error('the sidecar could not be reached before the lease would expire'));
    item.finish.abort();
  };
  const armFence = () => {
    if (fenceTimer || retired || item.lost || item.fenced.signal.aborted) return;
    fenceTimer = setTimeout(fence, Math.max(0, fenceAtMs(lease) - Date.now()));
  };
  const disarmFence = () => {
    if (fenceTimer) clearTimeout(fenceTimer);
    fenceTimer = null;
  };
  const calls = { signal: item.fenced.signal, onUnreachable: armFence };
  say(
    `assigned ${work.id} (session ${work.data ? work.data.id : '-'}), lease token of ${token.length} chars, ` +
      `lease ${assigned.lease.state} ttl ${assigned.lease.ttl_seconds}s`,
  );
  if (assigned.session_credentials && assigned.session_credentials.sessions_token) {
    say('  got the session credential for this item (not printed: it is a secret)');
  }

  // KeepAlive: one bidi stream for this lease; each ping is answered with the lease status, and changes are
  // pushed at once (LEASE_STATE_STOP_REQUESTED, LEASE_STATE_LOST).
  // If the sidecar restarts, a new KeepAlive stream with the same token re-attaches the lease.
  let keepAlive = null;
  let failures = 0;
  const openKeepAlive = () => {
    keepAlive = client.KeepAlive();
    keepAlive.on('data', (response) => {
      lease = response.lease;
      failures = 0;
      disarmFence();
      say(`  keepalive ${lease.work_id}: ${lease.state} ttl=${lease.ttl_seconds}s expires=${time(lease.expires_at)}`);
      if (lease.state === 'LEASE_STATE_LOST') {
        item.lost = true;
        item.finish.abort();
      } else if (lease.state === 'LEASE_STATE_STOP_REQUESTED') {
        item.finish.abort();
      }
    });
    keepAlive.on('error', (error) => {
      if (unreachable(error) && !item.finish.signal.aborted) {
        armFence(); // nobody may be renewing the lease until a KeepAlive answer comes again
        failures += 1;
        say(`  keepalive ${work.id}: the sidecar cannot be reached, reconnecting`);
        setTimeout(() => {
          if (!item.finish.signal.aborted) openKeepAlive();
        }, backoffMs(failures));
      } else if (error.code !== grpc.status.CANCELLED) {
        say(`  keepalive ${work.id} failed: ${error.message}`);
      }
    });
  };
  openKeepAlive();
  const ping = () => keepAlive.write({ work_id: work.id, lease_token: token });
  ping();
  const pinger = setInterval(ping, options.pingSeconds * 1000);

  try {
    // The "work": read the item, tag it, wait (or until a stop request or a lost lease ends it early).
    const current = await unary(client, 'GetWork', { work_id: work.id, lease_token: token }, calls);
    say(`  GetWork ${work.id}: ${current.work.state}, lease ${current.lease.state}`);
    const updated = await unary(client, 'UpdateWorkMetadata', {
      work_id: work.id,
      lease_token: token,
      set: { handled_by: options.sandboxId, language: 'node' },
    }, calls);
    say(`  UpdateWorkMetadata ${work.id}: metadata ${JSON.stringify(updated.work.metadata)}`);
    await pause(options.workSeconds * 1000, item.finish.signal);
  } catch (error) {
    if (!item.fenced.signal.aborted) say(`  work on ${work.id} failed: ${error.message}`);
  } finally {
    clearInterval(pinger);
    keepAlive.end();
    keepAlive.cancel();
  }

  const abandon = () => {
    retired = true;
    disarmFence();
    say(`abandoned ${work.id}: the lease is lost, not stopping it (it is not ours any more)`);
  };
  if (item.lost) return abandon();
  try {
    // Retried while the sidecar cannot be reached, but only until the fence: then the item is not ours to stop.
    const stopped = await unary(client, 'StopWork', { work_id: work.id, lease_token: token, force: true }, calls);
    say(`stopped ${work.id}: state ${stopped.work.state}`);
  } catch (error) {
    if (item.lost) return abandon();
    say(`stop ${work.id} failed: ${error.message}`);
  } finally {
    retired = true;
    disarmFence();
  }
}

/** Runs the sandbox until the watch ends, the sidecar drains, or (with `once`) the first item is done. */
function run(options) {
  const api = loadApi();
  // A local sidecar that restarts is back within seconds: look for it at least every second, not at gRPC's
  // default reconnect backoff (1 s growing to 120 s), which after a long outage finds it only when the item's
  // fence is near or past.
  const client = new api.WorkService(options.address, grpc.credentials.createInsecure(), {
    'grpc.initial_reconnect_backoff_ms': 100,
    'grpc.max_reconnect_backoff_ms': 1000,
  });
  const items = new Map(); // work id -> { finish, fenced: AbortController, lost: boolean, done: Promise }
  let handled = 0;
  let leaving = false;

  return new Promise((resolve, reject) => {
    say(`watching ${options.address} as ${options.sandboxId} (max_in_flight=${options.maxInFlight})`);
    let watch = null;
    let failures = 0;
    let unreachableSince = 0;

    // On Draining, keep the watch open until the last item is stopped: the open stream keeps this sandbox's
    // leases alive and carries StopRequested / LeaseLost for them.
    const settle = async () => {
      while (items.size > 0) await Promise.all([...items.values()].map((item) => item.done));
    };
    const leave = async () => {
      if (leaving) return;
      leaving = true;
      await settle();
      if (watch) watch.cancel();
    };
    let finished = false;
    const finish = async (error) => {
      if (finished) return;
      finished = true;
      await settle();
      client.close();
      if (error) return reject(error);
      say(`done: ${handled} item(s)`);
      resolve(handled);
    };

    const onEvent = (event) => {
      failures = 0;
      unreachableSince = 0;
      switch (event.event) {
        case 'work_assigned': {
          const assigned = event.work_assigned;
          const item = {
            finish: new AbortController(),
            fenced: new AbortController(),
            lost: false,
            done: null,
            token: assigned.lease_token,
          };
          items.set(assigned.work.id, item);
          item.done = workOn(client, assigned, item, options).finally(() => {
            items.delete(assigned.work.id);
            handled += 1;
          });
          if (options.once) {
            // Close the watch now, not after the item: a watch still open when the item is stopped has a free
            // slot again, and the sidecar would hand it a second item just before we leave. The lease lives on
            // the KeepAlive pings alone from here (they also bring STOP_REQUESTED and LOST).
            leaving = true;
            watch.cancel();
          }
          break;
        }
        case 'stop_requested': {
          const workId = event.stop_requested.work_id;
          say(`stop requested for ${workId}`);
          const item = items.get(workId);
          if (item) item.finish.abort();
          break;
        }
        case 'lease_lost': {
          const lost = event.lease_lost;
          say(`lease lost for ${lost.work_id}: ${lost.reason} (${lost.message})`);
          const item = items.get(lost.work_id);
          if (item) {
            item.lost = true;
            item.finish.abort();
          }
          break;
        }
        case 'draining':
          say(`the sidecar is draining (deadline ${time(event.draining.deadline)}): no new work will come`);
          leave();
          break;
        default:
          say(`unknown event ${event.event}`);
      }
    };
    const openWatch = () => {
      // After a reconnect, `resume` re-attaches the items still held to the new watch.
      const resume = [...items.entries()].map(([workId, item]) => ({ work_id: workId, lease_token: item.token }));
      watch = client.WatchWork({ max_in_flight: options.maxInFlight, sandbox_id: options.sandboxId, resume });
      watch.on('data', onEvent);
      // The watch ends: we cancelled it (leaving), the sidecar closed it, it cannot be reached, or it failed.
      watch.on('error', (error) => {
        if (unreachable(error) && !leaving) {
          unreachableSince = unreachableSince || Date.now();
          if (Date.now() - unreachableSince < RECONNECT_MS) {
            failures += 1;
            say('the sidecar cannot be reached: reconnecting the watch');
            setTimeout(openWatch, backoffMs(failures));
            return;
          }
        }
        finish(error.code === grpc.status.CANCELLED && leaving ? null : error);
      });
      watch.on('status', (status) => {
        if (status.code === grpc.status.OK) finish(null);
      });
    };
    openWatch();
  });
}

function parseOptions(argv, env) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      once: { type: 'boolean', default: false },
      'max-in-flight': { type: 'string' },
      'sandbox-id': { type: 'string', default: 'example-node' },
      'work-seconds': { type: 'string', default: '2' },
      'ping-seconds': { type: 'string', default: '3' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  return {
    help: values.help,
    address: positionals[0] || env.WORK_SIDECAR_ADDR || env.WORK_SIDECAR_ADDRESS || 'unix:///tmp/work-sidecar.sock',
    once: values.once,
    maxInFlight: Number(values['max-in-flight'] || (values.once ? 1 : 2)),
    sandboxId: values['sandbox-id'],
    workSeconds: Number(values['work-seconds']),
    pingSeconds: Number(values['ping-seconds']),
  };
}

if (require.main === module) {
  const options = parseOptions(process.argv.slice(2), process.env);
  if (options.help) {
    say('usage: node sandbox.js [unix:///path | host:port] [--once] [--max-in-flight N] [--sandbox-id ID]');
    say('       [--work-seconds S] [--ping-seconds S]   (address default: $WORK_SIDECAR_ADDR)');
    process.exit(0);
  }
  process.on('SIGINT', () => process.exit(130));
  process.on('SIGTERM', () => process.exit(143));
  run(options).then(
    () => process.exit(0),
    (error) => {
      say(`watch failed: ${error.message}`);
      process.exit(1);
    },
  );
}

module.exports = { loadApi, parseOptions, run, fenceMarginSeconds, fenceAtMs };
