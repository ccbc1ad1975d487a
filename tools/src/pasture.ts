#!/usr/bin/env -S node --import tsx
/**
 * pasture: the command-line tool. `pnpm pasture <command> --help` explains each command.
 * Every listing and benchmark takes --json and then prints exactly one JSON object.
 */
// The AWS SDK warns on every run that its releases after January 2027 need Node 22; Pasture
// pins the SDK's major version and supports Node 20, so the CLI does not repeat it to users.
process.env['AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED'] ??= 'true';
import { commands, type Command } from './commands.ts';
import { forwardIfLive } from './control.ts';

async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === '--help' || name === '-h' || name === 'help') {
    process.stdout.write(usage());
    return name === undefined ? 2 : 0;
  }
  const cmd: Command | undefined = commands.find((c) => c.name === name);
  if (cmd === undefined) {
    const message = `unknown command '${name}'. Run 'pnpm pasture --help' for the list.`;
    process.stderr.write(`pasture: ${message}\n`);
    // A failure with --json is one JSON object, as for every command.
    if (rest.includes('--json')) process.stdout.write(JSON.stringify({ error: message, code: 'EUSAGE' }) + '\n');
    return 2;
  }
  // A store that a running `pasture serve` holds is managed through its control socket.
  const forwarded = await forwardIfLive(argv);
  if (forwarded !== undefined) return forwarded;
  return cmd.run(rest);
}

function usage(): string {
  const width = Math.max(...commands.map((c) => c.name.length));
  return [
    'pasture: a layered block-storage stack (Grass / Cow / Human / NBD)',
    '',
    'Usage: pnpm pasture <command> [options]     (each command takes --help)',
    '',
    'Commands:',
    ...commands.map((c) => `  ${c.name.padEnd(width)}  ${c.summary}`),
    '',
  ].join('\n');
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (e: unknown) => {
    process.stderr.write(`pasture: ${e instanceof Error ? e.message : String(e)}\n`);
    process.exitCode = 1;
  },
);
