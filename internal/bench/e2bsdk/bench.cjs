// The bench's driver of the real `e2b` SDK (see internal/bench/e2b.go). Per sample, on a
// "go" line from stdin: Sandbox.create, then commands.run of the command, timed from
// before the create to the first stdout byte and to the end; it prints
// "sample ID CREATE_MS FIRST_MS EXIT_MS", waits for "done", kills the sandbox, prints
// "killed". Any failure exits non-zero with the reason.
'use strict'
const readline = require('node:readline')
const { Sandbox } = require('e2b')

const template = process.env.FW_TEMPLATE
const command = process.env.FW_COMMAND
const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]()
const next = async () => {
  const r = await lines.next()
  if (r.done) process.exit(0)
  return r.value
}

async function main() {
  for (;;) {
    if ((await next()) !== 'go') return
    const t0 = performance.now()
    const sbx = await Sandbox.create(template, { timeoutMs: 600_000 })
    const created = performance.now() - t0
    let first = 0
    const r = await sbx.commands.run(command, { onStdout: () => { if (!first) first = performance.now() - t0 } })
    const exit = performance.now() - t0
    if (r.exitCode !== 0 || !first) throw new Error(`command: exit ${r.exitCode}, stdout ${JSON.stringify(r.stdout)}`)
    console.log(`sample ${sbx.sandboxId} ${created.toFixed(2)} ${first.toFixed(2)} ${exit.toFixed(2)}`)
    if ((await next()) !== 'done') return
    await sbx.kill()
    console.log('killed')
  }
}

main().catch((e) => {
  console.error('e2b bench:', e)
  process.exit(1)
})
