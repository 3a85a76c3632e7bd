#!/usr/bin/env node
// Bundles src/ into one ES module without imports, dist/sigmax.js, and copies it to the
// gateway's app/static/sigmax.js: the app serves it to the dashboard, and the committed copy
// lets `make run` work without Node. Also writes the type declarations to dist/types/.
//
//   node scripts/build.mjs            build
//   node scripts/build.mjs --check    exit 1 if app/static/sigmax.js differs from a fresh build

import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';

export const PACKAGE_DIR = resolve(dirname(fileURLToPath(import.meta.url)), '..');
export const BUNDLE_PATH = resolve(PACKAGE_DIR, 'dist', 'sigmax.js');
export const STATIC_COPY_PATH = resolve(PACKAGE_DIR, '..', '..', 'app', 'static', 'sigmax.js');

const BANNER = '// SIGMAX WebSocket API client, built from client/typescript by `npm run build`. Do not edit.';

/** The bundle's text, as `npm run build` writes it. */
export async function bundle() {
  const result = await esbuild.build({
    entryPoints: [resolve(PACKAGE_DIR, 'src', 'index.ts')],
    bundle: true,
    format: 'esm',
    platform: 'neutral',
    target: 'es2022',
    charset: 'utf8',
    legalComments: 'none',
    banner: { js: BANNER },
    write: false,
    logLevel: 'silent',
  });
  return result.outputFiles[0].text;
}

async function main(args) {
  const text = await bundle();
  if (args.includes('--check')) {
    let current = '';
    try { current = readFileSync(STATIC_COPY_PATH, 'utf8'); } catch { /* missing: stale */ }
    if (current !== text) {
      console.error('app/static/sigmax.js differs from a fresh build of client/typescript: run `npm run build`');
      process.exitCode = 1;
    }
    return;
  }
  for (const path of [BUNDLE_PATH, STATIC_COPY_PATH]) {
    mkdirSync(dirname(path), { recursive: true });
    writeFileSync(path, text);
    console.log(`wrote ${path}`);
  }
  execFileSync(process.execPath, [resolve(PACKAGE_DIR, 'node_modules', 'typescript', 'bin', 'tsc'),
                                  '-p', resolve(PACKAGE_DIR, 'tsconfig.build.json')],
               { stdio: 'inherit' });
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  await main(process.argv.slice(2));
}
