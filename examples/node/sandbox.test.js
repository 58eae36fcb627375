// End-to-end test of the Node example sandbox: a real work-sidecar process (demo mode: its embedded Work API
// emulator), items enqueued through the emulator's admin API, the sandbox run as a child process.
//
//   node --test examples/node/          (needs `npm ci` here and the project's .venv: `make venv`)
//
// WORK_SIDECAR_BIN overrides the sidecar executable (default: ../../.venv/bin/work-sidecar).
'use strict';

const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const SANDBOX = path.join(__dirname, 'sandbox.js');
const WORK_API = require('./sandbox.js').loadApi();
const SIDECAR_BIN =
  process.env.WORK_SIDECAR_BIN || path.resolve(__dirname, '..', '..', '.venv', 'bin', 'work-sidecar');
const ENV = 'env_node';
const KEY = 'sk-node-example-test-key-0123456789';

// grpc.health.v1, enough of it to poll Check (as a JSON descriptor: no .proto file needed).
const HEALTH = grpc.loadPackageDefinition(
  protoLoader.fromJSON({
    nested: {
      grpc: {
        nested: {
          health: {
            nested: {
              v1: {
                nested: {
                  HealthCheckRequest: { fields: { service: { type: 'string', id: 1 } } },
                  HealthCheckResponse: {
                    fields: { status: { type: 'ServingStatus', id: 1 } },
                    nested: {
                      ServingStatus: { values: { UNKNOWN: 0, SERVING: 1, NOT_SERVING: 2, SERVICE_UNKNOWN: 3 } },
                    },
                  },
                  Health: {
                    methods: { Check: { requestType: 'HealthCheckRequest', responseType: 'HealthCheckResponse' } },
                  },
                },
              },
            },
          },
        },
      },
    },
  }, { enums: String }),
).grpc.health.v1;

const children = new Set();
process.on('exit', () => {
  for (const child of children) child.kill('SIGKILL');
});

/** Polls `probe` (sync or async) until it returns something truthy; fails after `timeoutMs`. */
async function eventually(probe, { timeoutMs = 20000, intervalMs = 50, message = 'condition not met' } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await probe();
    } catch (error) {
      last = error;
    }
    if (last && !(last instanceof Error)) return last;
    if (Date.now() > deadline) throw new Error(`${message} within ${timeoutMs} ms (last: ${last})`);
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
}

/** Spawns a process and collects its output; it is killed when the test process ends. */
function launch(command, args, options = {}) {
  const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'], ...options });
  const run = { child, stdout: '', stderr: '', exit: null };
  child.stdout.on('data', (chunk) => (run.stdout += chunk));
  child.stderr.on('data', (chunk) => (run.stderr += chunk));
  run.exited = new Promise((resolve) => {
    child.on('exit', (code, signal) => {
      children.delete(child);
      run.exit = { code, signal };
      resolve(run.exit);
    });
  });
  children.add(child);
  return run;
}

/** Kills a launched process (SIGTERM, then SIGKILL if it lingers) and waits for it. */
async function stop(run, graceMs = 10000) {
  if (run.exit) return run.exit;
  run.child.kill('SIGTERM');
  const timer = setTimeout(() => run.child.kill('SIGKILL'), graceMs);
  const exit = await run.exited;
  clearTimeout(timer);
  return exit;
}

function healthCheck(address) {
  const client = new HEALTH.Health(address, grpc.credentials.createInsecure());
  return new Promise((resolve) => {
    client.Check({ service: '' }, { deadline: Date.now() + 1000 }, (error, response) => {
      client.close();
      resolve(!error && response.status === 'SERVING');
    });
  }).catch(() => false);
}

/** A TCP port that was free a moment ago (the sidecar binds it next). */
async function freePort() {
  const server = net.createServer();
  await new Promise((resolve, reject) => server.once('error', reject).listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

// Starting a Python process can take long on a loaded machine: readiness is gRPC health SERVING, polled with a
// generous deadline (never a fixed wait for a log line).
const STARTUP_TIMEOUT_MS = 120000;

/**
 * Starts `work-sidecar serve` in demo mode on a Unix socket and a free TCP port, with the embedded emulator on a
 * free port; ready once gRPC health answers SERVING. Its files live in a directory of os.tmpdir() (TMPDIR), removed
 * when it is closed or fails to start.
 */
async function startSidecar() {
  assert.ok(fs.existsSync(SIDECAR_BIN), `${SIDECAR_BIN} is missing: run make venv (or set WORK_SIDECAR_BIN)`);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ws-node-'));
  const socket = path.join(dir, 'sidecar.sock');
  const unix = `unix://${socket}`;
  const tcp = `127.0.0.1:${await freePort()}`;
  const emulatorPort = await freePort();
  // The key is ours, so the test can also play the platform (a graceful stop through the Work API).
  const run = launch(SIDECAR_BIN, [
    'serve', '--listen', unix, '--listen', tcp, '--emulator-port', String(emulatorPort),
    '--environment-id', ENV, '--ttl', '10', '--log-format', 'json',
  ], { env: { ...process.env, WORK_SIDECAR_API_KEY: KEY } }); // prettier-ignore
  const close = async () => {
    await stop(run);
    fs.rmSync(dir, { recursive: true, force: true });
  };
  try {
    const deadline = Date.now() + STARTUP_TIMEOUT_MS;
    while (!(await healthCheck(unix))) {
      if (run.exit) throw new Error(`the sidecar exited (${JSON.stringify(run.exit)}): ${run.stderr.slice(-2000)}`);
      if (Date.now() > deadline) {
        throw new Error(`sidecar health not SERVING within ${STARTUP_TIMEOUT_MS} ms: ${run.stderr.slice(-2000)}`);
      }
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  } catch (error) {
    await close();
    throw error;
  }
  return { run, unix, tcp, apiUrl: `http://127.0.0.1:${emulatorPort}`, close };
}

/** GetQueueStats, with the sandbox's own loader of sidecar.work.v1. */
function queueStats(address) {
  const client = new WORK_API.WorkService(address, grpc.credentials.createInsecure());
  return new Promise((resolve, reject) => {
    client.GetQueueStats({}, { deadline: Date.now() + 5000 }, (error, response) => {
      client.close();
      if (error) reject(error);
      else resolve(response);
    });
  });
}

async function admin(sidecar, method, route, body) {
  const response = await fetch(`${sidecar.apiUrl}${route}`, {
    method,
    headers: { 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  assert.ok(response.ok, `${method} ${route}: HTTP ${response.status}`);
  return response.json();
}

async function enqueue(sidecar) {
  const { data } = await admin(sidecar, 'POST', `/_emulator/environments/${ENV}/work`, { count: 1 });
  return data[0].id;
}

const item = (sidecar, workId) => admin(sidecar, 'GET', `/_emulator/environments/${ENV}/work/${workId}`);

function runSandbox(args, env = {}) {
  return launch(process.execPath, [SANDBOX, ...args], { env: { ...process.env, ...env }, cwd: __dirname });
}

/** Waits for a sandbox to exit by itself (killing it after the deadline). */
async function finished(sandbox, timeoutMs = 30000) {
  const timer = setTimeout(() => sandbox.child.kill('SIGKILL'), timeoutMs);
  const exit = await sandbox.exited;
  clearTimeout(timer);
  assert.deepEqual(exit, { code: 0, signal: null }, `the sandbox failed:\n${sandbox.stdout}\n${sandbox.stderr}`);
  return sandbox.stdout;
}

let shared;
after(async () => {
  if (shared) await shared.close();
});

test('--once on a unix:// address from argv: each run takes one item, keeps it alive, works and stops it', async () => {
  shared = await startSidecar();
  const workIds = [await enqueue(shared), await enqueue(shared)];
  const seen = [];
  // Two runs for two items: a --once sandbox must not take a second item on its way out (it would sit leased to a
  // gone sandbox for the whole re-attach grace, and the second run would wait for it in vain).
  for (const run of [1, 2]) {
    const sandbox = runSandbox([shared.unix, '--once', '--sandbox-id', 'node-test', '--work-seconds', '1',
      '--ping-seconds', '0.2']); // prettier-ignore
    const out = await finished(sandbox);
    const assigned = out.match(/assigned (work_\w+) \(session \S+\), lease token of (\d+) chars/);
    assert.ok(assigned, `run ${run}: no WorkAssigned in:\n${out}`);
    const workId = assigned[1];
    assert.ok(workIds.includes(workId) && !seen.includes(workId), `run ${run} took ${workId}`);
    seen.push(workId);
    assert.ok(Number(assigned[2]) > 0, 'WorkAssigned carries a non-empty lease token');
    assert.match(out, new RegExp(`keepalive ${workId}: LEASE_STATE_ACTIVE`), 'KeepAlive answers the ping');
    assert.match(out, new RegExp(`GetWork ${workId}: WORK_STATE_ACTIVE`));
    assert.match(out, new RegExp(`stopped ${workId}: state WORK_STATE_STOPPED`));
    assert.match(out, /done: 1 item\(s\)/);
    assert.equal((out.match(/\] assigned /g) || []).length, 1, 'a --once sandbox takes exactly one item');
    const { data: requests } = await admin(shared, 'GET', '/_emulator/requests');
    const acked = requests.filter((r) => r.operation === 'ack').map((r) => r.path.split('/').at(-2));
    assert.deepEqual(acked.sort(), [...seen].sort(), 'a --once sandbox leaves without being handed a second item');
  }
  for (const workId of workIds) {
    const view = await item(shared, workId);
    assert.equal(view.state, 'stopped', 'the Work API has the item stopped');
    assert.deepEqual(view.metadata, { handled_by: 'node-test', language: 'node' }, 'UpdateWorkMetadata reached it');
  }
});

test('WORK_SIDECAR_ADDR over TCP; a graceful stop by the platform ends the work early (StopRequested)', async () => {
  const sidecar = shared || (shared = await startSidecar());
  const workId = await enqueue(sidecar);
  const started = Date.now();
  const sandbox = runSandbox(['--once', '--work-seconds', '120'], { WORK_SIDECAR_ADDR: sidecar.tcp });
  try {
    await eventually(() => sandbox.stdout.includes(`UpdateWorkMetadata ${workId}`) || sandbox.exit, {
      message: 'the sandbox is working on the item',
    });
    assert.match(sandbox.stdout, new RegExp(`watching ${sidecar.tcp.replace(/\./g, '\\.')} `));
    // The platform asks for a graceful stop through the public Work API (as the console would).
    const response = await fetch(`${sidecar.apiUrl}/v1/environments/${ENV}/work/${workId}/stop`, {
      method: 'POST',
      headers: {
        authorization: `Bearer ${KEY}`,
        'anthropic-version': '2023-06-01',
        'anthropic-beta': 'managed-agents-2026-04-01',
        'content-type': 'application/json',
      },
      body: JSON.stringify({ force: false }),
    });
    assert.ok(response.ok, `platform stop: HTTP ${response.status}`);
    const out = await finished(sandbox, 60000);
    assert.ok(
      out.includes(`stop requested for ${workId}`) || out.includes(`keepalive ${workId}: LEASE_STATE_STOP_REQUESTED`),
      `the sandbox saw the stop request:\n${out}`,
    );
    assert.match(out, new RegExp(`stopped ${workId}: state WORK_STATE_STOPPED`));
    assert.ok(Date.now() - started < 60000, 'the stop request ended the 120 s of work early');
    assert.equal((await item(sidecar, workId)).state, 'stopped');
  } finally {
    await stop(sandbox);
  }
});

test('Draining: a sidecar that is shut down makes an idle sandbox leave cleanly', async () => {
  const sidecar = await startSidecar();
  try {
    const sandbox = runSandbox([sidecar.unix]);
    try {
      // Idle and watching: the sidecar counts one watcher with free capacity.
      await eventually(() => sandbox.stdout.includes('watching ') || sandbox.exit, { message: 'sandbox started' });
      await eventually(async () => (await queueStats(sidecar.unix)).sidecar.watchers === 1, {
        message: 'the sidecar counts the sandbox as a watcher',
      });
      sidecar.run.child.kill('SIGTERM');
      const out = await finished(sandbox);
      assert.match(out, /the sidecar is draining/);
      assert.match(out, /done: 0 item\(s\)/);
    } finally {
      await stop(sandbox);
    }
    assert.deepEqual(await sidecar.run.exited, { code: 0, signal: null }, 'the sidecar drained and exited 0');
  } finally {
    await sidecar.close();
  }
});

test('the address: argv, else WORK_SIDECAR_ADDR, else its alias WORK_SIDECAR_ADDRESS', () => {
  const { parseOptions } = require('./sandbox.js');
  const both = { WORK_SIDECAR_ADDR: 'unix:///a.sock', WORK_SIDECAR_ADDRESS: '127.0.0.1:1' };
  assert.equal(parseOptions(['127.0.0.1:2'], both).address, '127.0.0.1:2');
  assert.equal(parseOptions([], both).address, 'unix:///a.sock');
  assert.equal(parseOptions([], { WORK_SIDECAR_ADDRESS: '127.0.0.1:1' }).address, '127.0.0.1:1');
  assert.equal(parseOptions([], {}).address, 'unix:///tmp/work-sidecar.sock');
});

test('the fencing rule of sidecar/_fencing.py: max(1.5 s, 10 % of the TTL), at most half the TTL', () => {
  const { fenceMarginSeconds, fenceAtMs } = require('./sandbox.js');
  assert.deepEqual([2, 4, 15, 60].map(fenceMarginSeconds), [1, 1.5, 1.5, 6]);
  const lease = { ttl_seconds: 60, expires_at: { seconds: '1000', nanos: 500_000_000 } };
  assert.equal(fenceAtMs(lease), 1_000_500 - 6_000, 'the margin before the last known expiry');
  const before = Date.now();
  assert.ok(fenceAtMs({ ttl_seconds: 60, expires_at: null }) >= before, 'an unknown expiry fences at once');
});
