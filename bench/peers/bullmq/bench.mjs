// The taskfleet benchmark workload on BullMQ: N no-op jobs added in bulk, run by W worker
// processes of concurrency C on the same Redis, until every job is completed (BullMQ keeps
// completed jobs, as taskfleet keeps results). Prints one JSON line:
// {"system":"bullmq","tasks":N,"seconds":S,"tasks_per_s":R,"p50_ms":..,"p99_ms":..}
// where latency is job creation (producer clock) to completion (worker clock), both from
// performance.timeOrigin + performance.now(), comparable across processes on one machine.
//
//   node bench.mjs --redis redis://127.0.0.1:6390 --tasks 100000 --workers 2 --concurrency 64
import { Queue, Worker } from 'bullmq';
import { fork } from 'node:child_process';

const arg = (name, dflt) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : dflt;
};
const url = new URL(arg('redis', 'redis://127.0.0.1:6379'));
const connection = { host: url.hostname, port: Number(url.port || 6379) };
const queueName = arg('queue', `bench-${process.pid}`);
const now = () => performance.timeOrigin + performance.now();

if (process.argv.includes('--worker')) {
  // Worker process: run jobs, report each completion's latency to the parent in batches.
  const concurrency = Number(arg('concurrency', '64'));
  let buf = [];
  const flush = () => { if (buf.length) { process.send(buf); buf = []; } };
  setInterval(flush, 50);
  const worker = new Worker(queueName, async (job) => job.data, { connection, concurrency });
  worker.on('completed', (job) => { buf.push(now() - job.data.t0); if (buf.length >= 1000) flush(); });
  process.on('message', async (m) => { if (m === 'stop') { flush(); await worker.close(); process.exit(0); } });
} else {
  const tasks = Number(arg('tasks', '100000'));
  const workers = Number(arg('workers', '2'));
  const concurrency = arg('concurrency', '64');
  const queue = new Queue(queueName, { connection });
  await queue.obliterate({ force: true }).catch(() => {});
  const latencies = [];
  const children = [];
  let done = 0;
  let finish;
  const finished = new Promise((r) => { finish = r; });
  for (let i = 0; i < workers; i++) {
    const child = fork(new URL(import.meta.url).pathname,
      ['--worker', '--redis', url.toString(), '--queue', queueName, '--concurrency', concurrency]);
    child.on('message', (batch) => {
      for (const l of batch) latencies.push(l);
      done += batch.length;
      if (done >= tasks) finish();
    });
    children.push(child);
  }
  await new Promise((r) => setTimeout(r, 1000));
  const start = now();
  for (let i = 0; i < tasks; i += 1000) {
    const jobs = [];
    for (let j = i; j < Math.min(tasks, i + 1000); j++) jobs.push({ name: 'echo', data: { i: j, t0: now() } });
    await queue.addBulk(jobs);
  }
  await finished;
  const seconds = (now() - start) / 1000;
  latencies.sort((a, b) => a - b);
  const pct = (p) => latencies[Math.min(latencies.length - 1, Math.floor(latencies.length * p))];
  for (const c of children) c.send('stop');
  await queue.obliterate({ force: true }).catch(() => {});
  await queue.close();
  console.log(JSON.stringify({ system: 'bullmq', tasks, seconds, tasks_per_s: tasks / seconds, p50_ms: pct(0.5), p99_ms: pct(0.99) }));
  process.exit(0);
}
