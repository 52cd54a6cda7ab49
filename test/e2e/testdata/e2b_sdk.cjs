// The real `e2b` SDK against Fireworks (run by TestE2BSDK, which sets the environment:
// E2B_API_KEY, E2B_API_URL, E2B_SANDBOX_URL, E2B_DOMAIN, NODE_EXTRA_CA_CERTS, NODE_PATH
// and FW_*). Every step asserts what the SDK returns; the first failure exits non-zero
// with the step's name. Lines "fact NAME VALUE" tell the Go test what it checks from the
// outside.
'use strict'
const assert = require('node:assert/strict')
const crypto = require('node:crypto')
const fs = require('node:fs')
const https = require('node:https')
const os = require('node:os')
const path = require('node:path')
const { Sandbox, Template, BuildError, CommandExitError, AuthenticationError, NotFoundError, SandboxNotFoundError, TimeoutError } = require('e2b')

const template = process.env.FW_TEMPLATE
const run = process.env.FW_RUN
const edge = new URL(process.env.E2B_API_URL)
let step = 'start'
const say = (...a) => console.log(...a)
const fact = (k, v) => say('fact', k, v)
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

async function until(what, fn, ms = 20000) {
  const end = Date.now() + ms
  for (;;) {
    const v = await fn()
    if (v) return v
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`)
    await sleep(100)
  }
}

// GET through the edge by the host getHost names, as a browser with DNS for it would.
function getVia(host, path = '/') {
  return new Promise((resolve, reject) => {
    const req = https.request({ host: edge.hostname, port: edge.port, servername: host.split(':')[0], path, headers: { host } }, (res) => {
      let body = ''
      res.on('data', (d) => (body += d))
      res.on('end', () => resolve({ status: res.statusCode, body }))
    })
    req.on('error', reject)
    req.end()
  })
}

async function main() {
  step = 'create'
  const t0 = Date.now()
  const sbx = await Sandbox.create(template, { metadata: { suite: 'e2b', run, owner: 'alice@example.com', 'a b': 'x&y=z' }, envs: { GREETING: 'hello from envVars' }, timeoutMs: 600_000 })
  fact('sandbox', sbx.sandboxId)
  say('created', sbx.sandboxId, 'in', Date.now() - t0, 'ms')

  step = 'foreground command: output, stderr, exit code'
  let streamed = ''
  const ok = await sbx.commands.run('echo "$GREETING"; echo to-stderr >&2; pwd', { onStdout: (d) => (streamed += d) })
  assert.equal(ok.exitCode, 0)
  assert.match(ok.stdout, /^hello from envVars\n/)
  assert.equal(ok.stderr, 'to-stderr\n')
  assert.match(streamed, /hello from envVars/)
  await assert.rejects(sbx.commands.run('echo out; exit 3'), (e) => e instanceof CommandExitError && e.exitCode === 3 && e.stdout === 'out\n')
  const detached = await sbx.commands.run('sleep 300 & echo started', { timeoutMs: 20_000 })
  assert.equal(detached.stdout, 'started\n')

  step = 'background command with stdin, then kill'
  let bg = ''
  const h = await sbx.commands.run('cat', { background: true, stdin: true, onStdout: (d) => (bg += d) })
  await sbx.commands.sendStdin(h.pid, 'ping through stdin\n')
  await until('the background command to echo its stdin', () => bg.includes('ping through stdin'))
  assert.ok((await sbx.commands.list()).some((p) => p.pid === h.pid), 'the background command is listed')
  assert.equal(await sbx.commands.kill(h.pid), true)
  await until('the killed command to leave the list', async () => !(await sbx.commands.list()).some((p) => p.pid === h.pid))

  step = 'pty'
  let tty = ''
  const pty = await sbx.pty.create({ cols: 100, rows: 30, onData: (d) => (tty += Buffer.from(d).toString()) })
  await sbx.pty.sendInput(pty.pid, new TextEncoder().encode('stty size; tty\n'))
  await until('the terminal to answer', () => /30 100/.test(tty) && /\/dev\/pts\//.test(tty))
  await sbx.pty.resize(pty.pid, { cols: 120, rows: 40 })
  await sbx.pty.sendInput(pty.pid, new TextEncoder().encode('stty size; exit 0\n'))
  await until('the resized terminal to answer', () => /40 120/.test(tty))

  step = 'files: text, 20 MB binary, list, rename, remove'
  await sbx.files.makeDir('/work/sub')
  await sbx.files.write('/work/hello.txt', 'hello file\n')
  assert.equal(await sbx.files.read('/work/hello.txt'), 'hello file\n')
  const big = crypto.randomBytes(20 << 20)
  await sbx.files.write('/work/big.bin', new Blob([big]))
  const back = Buffer.from(await sbx.files.read('/work/big.bin', { format: 'bytes' }))
  assert.equal(back.length, big.length)
  assert.equal(crypto.createHash('sha256').update(back).digest('hex'), crypto.createHash('sha256').update(big).digest('hex'))
  const names = (await sbx.files.list('/work')).map((e) => e.name).sort()
  assert.deepEqual(names, ['big.bin', 'hello.txt', 'sub'])
  await sbx.files.rename('/work/hello.txt', '/work/sub/renamed.txt')
  assert.equal(await sbx.files.exists('/work/hello.txt'), false)
  assert.equal(await sbx.files.read('/work/sub/renamed.txt'), 'hello file\n')
  await sbx.files.remove('/work/big.bin')
  assert.equal(await sbx.files.exists('/work/big.bin'), false)
  await assert.rejects(sbx.files.read('/work/none'), (e) => e instanceof NotFoundError)

  step = 'watch a directory'
  const events = []
  const w = await sbx.files.watchDir('/work/sub', (e) => events.push(e))
  await sbx.files.write('/work/sub/new.txt', 'x')
  await until('a watch event for new.txt', () => events.some((e) => e.name === 'new.txt'))
  await w.stop()

  step = 'a guest HTTP server through getHost'
  const web = fs.readFileSync(process.env.FW_GUESTWEB)
  await sbx.files.write('/usr/local/bin/guestweb', new Blob([web]))
  await sbx.commands.run('chmod 755 /usr/local/bin/guestweb')
  await sbx.commands.run('guestweb -listen :8000', { background: true })
  const host = sbx.getHost(8000)
  assert.equal(host, `8000-${sbx.sandboxId}.${process.env.E2B_DOMAIN}`)
  const page = await until('the guest server to answer', async () => {
    const r = await getVia(host).catch(() => null)
    return r && r.status === 200 ? r : null
  })
  assert.equal(JSON.parse(page.body).host, host)

  step = 'list with a metadata filter'
  const other = await Sandbox.create(template, { metadata: { suite: 'e2b', run: run + '-other' }, timeoutMs: 600_000 })
  const listed = await Sandbox.list({ query: { metadata: { run, owner: 'alice@example.com', 'a b': 'x&y=z' } } }).nextItems()
  assert.deepEqual(listed.map((s) => s.sandboxId), [sbx.sandboxId])
  assert.equal(listed[0].metadata.suite, 'e2b')
  assert.equal(listed[0].state, 'running')
  const info = await sbx.getInfo()
  assert.equal(info.templateId, template)

  step = 'pause and resume: files and processes kept'
  await sbx.commands.run('echo kept > /work/sub/kept.txt')
  const sleeper = await sbx.commands.run('sleep 100000', { background: true })
  assert.equal(await sbx.pause(), true)
  assert.equal((await Sandbox.getInfo(sbx.sandboxId)).state, 'paused')
  const resumed = await Sandbox.connect(sbx.sandboxId, { timeoutMs: 600_000 })
  assert.equal(await resumed.files.read('/work/sub/kept.txt'), 'kept\n')
  assert.ok((await resumed.commands.list()).some((p) => p.pid === sleeper.pid), 'the process started before the pause runs on')

  step = 'fork'
  const [fork] = await resumed.fork()
  assert.ok(!(fork instanceof Error), `fork failed: ${fork}`)
  assert.notEqual(fork.sandboxId, resumed.sandboxId)
  assert.equal(await fork.files.read('/work/sub/kept.txt'), 'kept\n')
  await fork.files.write('/work/sub/kept.txt', 'changed in the fork\n')
  assert.equal(await resumed.files.read('/work/sub/kept.txt'), 'kept\n')
  fact('fork', fork.sandboxId)

  step = 'timeout: the sandbox ends'
  await other.setTimeout(2000)
  await until('the sandbox to end at its timeout', async () => {
    try {
      await Sandbox.getInfo(other.sandboxId)
      return false
    } catch (e) {
      if (e instanceof SandboxNotFoundError || e instanceof NotFoundError) return true
      throw e
    }
  }, 30000)
  assert.equal(await other.isRunning(), false)
  fact('timed_out', other.sandboxId)

  step = 'a template built from a Dockerfile'
  const b = await Sandbox.create(process.env.FW_BUILT_TEMPLATE, { timeoutMs: 120_000 })
  const who = await b.commands.run('id -un; cat /etc/built; echo $BUILT')
  assert.equal(who.stdout, 'app\nbuilt-by-buildah\nyes\n')
  await b.kill()

  step = 'a template built by the SDK (Template.build): COPY, RUN, ENV, WORKDIR, USER, start and ready commands'
  const ctxDir = fs.mkdtempSync(path.join(os.tmpdir(), 'fw-e2b-context-'))
  fs.mkdirSync(path.join(ctxDir, 'app/sub'), { recursive: true })
  fs.writeFileSync(path.join(ctxDir, 'app/hello.txt'), 'hello from the context\n')
  fs.writeFileSync(path.join(ctxDir, 'app/sub/run.sh'), '#!/bin/sh\necho run-sh\n', { mode: 0o755 })
  fs.writeFileSync(path.join(ctxDir, 'config.json'), '{"k":1}\n')
  const sdkBuilt = 'fw-sdk-built'
  const buildLogs = []
  const onBuildLogs = (l) => buildLogs.push(l.message)
  const tpl = Template({ fileContextPath: ctxDir })
    .fromImage(process.env.FW_BASE_IMAGE)
    .runCmd('useradd -m -u 1001 builder && echo made-user')
    .copy('app', '/opt/app/')
    .copy('config.json', '/etc/fw/config.json', { user: 'builder', mode: 0o600 })
    .setEnvs({ FW_BUILT: 'by-the-sdk' })
    .setWorkdir('/opt/app')
    .setUser('builder')
    .runCmd('echo "$FW_BUILT as $(id -un) in $(pwd)" > /tmp/built.txt')
    .setStartCmd('echo started > /tmp/started; exec sleep 100000', 'test -f /tmp/started')
  const t1 = Date.now()
  const built1 = await Template.build(tpl, sdkBuilt, { cpuCount: 1, memoryMB: 512, onBuildLogs })
  say('built', sdkBuilt, 'in', Date.now() - t1, 'ms')
  assert.equal(built1.name, sdkBuilt)
  assert.ok(buildLogs.includes('made-user'), `the build log has the RUN's output: ${JSON.stringify(buildLogs)}`)
  assert.equal(await Template.exists(sdkBuilt), true)
  assert.equal(await Template.exists('fw-no-such-template'), false)
  const fromBuilt = await Sandbox.create(sdkBuilt, { envs: { EXTRA: 'given-at-create' }, timeoutMs: 120_000 })
  const seen = await fromBuilt.commands.run('cat /tmp/built.txt /opt/app/hello.txt; /opt/app/sub/run.sh; stat -c "%U %a" /etc/fw/config.json; echo $FW_BUILT $EXTRA; id -un; pwd; cat /tmp/started; grep -qs "sleep 100000" /proc/[0-9]*/cmdline && echo start-command-runs')
  assert.equal(seen.stdout, 'by-the-sdk as builder in /opt/app\nhello from the context\nrun-sh\nbuilder 600\nby-the-sdk given-at-create\nbuilder\n/opt/app\nstarted\nstart-command-runs\n')
  await fromBuilt.kill()

  step = 'a rebuild of the template, from itself (fromTemplate)'
  // The base template's environment, working directory and running start command carry
  // on; an ENV value's variables are expanded (nothing else); a USER that does not exist
  // is made.
  await Template.build(Template().fromTemplate(sdkBuilt).setEnvs({ FW_V2: '${FW_BUILT}-v2', FW_QUOTED: 'it"s $(not run)' }).setUser('second')
    .runCmd('echo "v2 as $(id -un) in $(pwd)" > /tmp/v2'), sdkBuilt, { onBuildLogs })
  const v2 = await Sandbox.create(sdkBuilt, { timeoutMs: 120_000 })
  assert.equal((await v2.commands.run('cat /tmp/built.txt /tmp/v2; echo $FW_BUILT $FW_V2; echo "$FW_QUOTED"; id -un; pwd; grep -qs "sleep 100000" /proc/[0-9]*/cmdline && echo start-command-runs')).stdout,
    'by-the-sdk as builder in /opt/app\nv2 as second in /opt/app\nby-the-sdk by-the-sdk-v2\nit"s $(not run)\nsecond\n/opt/app\nstart-command-runs\n')
  await v2.kill()
  fact('sdk_built', sdkBuilt)

  step = 'a failing build'
  const failLogs = []
  await assert.rejects(
    Template.build(Template().fromImage(process.env.FW_BASE_IMAGE).runCmd('echo failing-step; exit 7'), 'fw-sdk-fails', { onBuildLogs: (l) => failLogs.push(l.message) }),
    (e) => e instanceof BuildError && /exited with code 7/.test(e.message))
  assert.ok(failLogs.includes('failing-step'), `the failed build's log: ${JSON.stringify(failLogs)}`)
  // A start command that ends fails the build, which shows its output.
  failLogs.length = 0
  await assert.rejects(
    Template.build(Template().fromImage(process.env.FW_BASE_IMAGE).setStartCmd('echo start-failed; exit 3', 'false'), 'fw-sdk-fails', { onBuildLogs: (l) => failLogs.push(l.message) }),
    (e) => e instanceof BuildError && /start command ended/.test(e.message))
  assert.ok(failLogs.includes('start-failed'), `the failed start's log: ${JSON.stringify(failLogs)}`)
  assert.equal(await Template.exists('fw-sdk-fails'), false)

  step = 'errors the SDK maps'
  await assert.rejects(Sandbox.create(template, { apiKey: 'fw_not-a-real-token' }), (e) => e instanceof AuthenticationError)
  await assert.rejects(Sandbox.connect('0123456789abcdef'), (e) => e instanceof SandboxNotFoundError || e instanceof NotFoundError)
  await assert.rejects(Sandbox.create('no-such-template'), (e) => e instanceof NotFoundError || /404/.test(String(e)))
  await assert.rejects(resumed.commands.run('sleep 30', { timeoutMs: 1000 }), (e) => e instanceof TimeoutError)

  step = 'kill'
  assert.equal(await fork.kill(), true)
  assert.equal(await Sandbox.kill(resumed.sandboxId), true)
  assert.equal(await Sandbox.kill(resumed.sandboxId), false)
  await assert.rejects(Sandbox.getInfo(resumed.sandboxId), (e) => e instanceof SandboxNotFoundError || e instanceof NotFoundError)
  fact('killed', resumed.sandboxId)
  say('ALL OK')
}

main().catch((e) => {
  console.error(`FAILED at step "${step}":`, e)
  process.exit(1)
})
