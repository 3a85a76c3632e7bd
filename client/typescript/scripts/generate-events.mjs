#!/usr/bin/env node
// Writes src/events.generated.ts from the gateway's AsyncAPI document: the data interfaces of
// every message, the event type unions and the topics. The document comes from the gateway's
// own code (app/apidocs/asyncapi.py, served at /asyncapi.json), so the types cannot drift from
// what the server sends; `--check` fails when the committed file is out of date.
//
//   node scripts/generate-events.mjs            regenerate from the gateway's code
//   node scripts/generate-events.mjs --check    exit 1 if src/events.generated.ts is stale
//   node scripts/generate-events.mjs --input asyncapi.json [--check]

import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

export const PACKAGE_DIR = resolve(dirname(fileURLToPath(import.meta.url)), '..');
export const REPOSITORY_DIR = resolve(PACKAGE_DIR, '..', '..');
export const GENERATED_PATH = resolve(PACKAGE_DIR, 'src', 'events.generated.ts');

const DOCUMENT_SCRIPT =
  'import json; from app.apidocs.asyncapi import asyncapi_document; ' +
  'print(json.dumps(asyncapi_document()))';

/** The Python that runs the gateway: $SIGMAX_PYTHON, else the repository's virtualenv. */
export function gatewayPython() {
  return process.env.SIGMAX_PYTHON || resolve(PACKAGE_DIR, '..', '..', '.venv', 'bin', 'python');
}

/** The AsyncAPI document as the gateway builds it. */
export function loadDocument() {
  const output = execFileSync(gatewayPython(), ['-c', DOCUMENT_SCRIPT], {
    cwd: REPOSITORY_DIR,
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'pipe'],
    timeout: 60_000,
  });
  return JSON.parse(output);
}

const REF_PREFIX = '#/components/schemas/';

function refName(ref) {
  if (!ref.startsWith(REF_PREFIX)) throw new Error(`unsupported $ref ${ref}`);
  return ref.slice(REF_PREFIX.length);
}

function comment(text, indent) {
  if (!text) return '';
  const lines = String(text).replace(/\*\//g, '*\\/').split('\n');
  if (lines.length === 1) return `${indent}/** ${lines[0]} */\n`;
  return `${indent}/**\n${lines.map((line) => `${indent} * ${line}`.trimEnd()).join('\n')}\n${indent} */\n`;
}

function propertyKey(name) {
  return /^[A-Za-z_$][A-Za-z0-9_$]*$/.test(name) ? name : JSON.stringify(name);
}

/** The TypeScript type of a JSON Schema (the subset pydantic and docs.py produce). */
function typeOf(schema, indent = '') {
  if (schema === true || schema === undefined || schema === null) return 'unknown';
  if (schema.$ref) return refName(schema.$ref);
  if ('const' in schema) return JSON.stringify(schema.const);
  if (schema.enum) return schema.enum.map((value) => JSON.stringify(value)).join(' | ');
  const variants = schema.anyOf ?? schema.oneOf;
  if (variants) return [...new Set(variants.map((variant) => typeOf(variant, indent)))].join(' | ');
  if (schema.allOf) return schema.allOf.map((part) => typeOf(part, indent)).join(' & ');
  if (Array.isArray(schema.type)) {
    return schema.type.map((type) => typeOf({ ...schema, type }, indent)).join(' | ');
  }
  switch (schema.type) {
    case 'string': return 'string';
    case 'integer':
    case 'number': return 'number';
    case 'boolean': return 'boolean';
    case 'null': return 'null';
    case 'array': {
      const item = typeOf(schema.items, indent);
      return /^[A-Za-z0-9_]+$/.test(item) ? `${item}[]` : `Array<${item}>`;
    }
    case 'object': {
      if (!schema.properties) {
        const values = schema.additionalProperties;
        // The index signature form may refer to the alias being declared (JsonValue).
        return values && values !== true ? `{ [key: string]: ${typeOf(values, indent)} }` : 'Record<string, unknown>';
      }
      return `{\n${members(schema, `${indent}  `)}${indent}}`;
    }
    default: return 'unknown';
  }
}

function members(schema, indent) {
  const required = new Set(schema.required ?? []);
  let text = '';
  for (const [name, property] of Object.entries(schema.properties ?? {})) {
    text += comment(property.description, indent);
    const optional = required.has(name) ? '' : '?';
    text += `${indent}${propertyKey(name)}${optional}: ${typeOf(property, indent)};\n`;
  }
  // pydantic's extra="allow": the gateway may send more fields than it documents.
  if (schema.additionalProperties) text += `${indent}[field: string]: unknown;\n`;
  return text;
}

function declaration(name, schema) {
  const doc = comment(schema.description, '');
  if (schema.type === 'object' && schema.properties) {
    return `${doc}export interface ${name} {\n${members(schema, '  ')}}\n`;
  }
  return `${doc}export type ${name} = ${typeOf(schema)};\n`;
}

/** The `data` schema and the extra envelope fields of one message, from its payload. */
function messageParts(message) {
  const parts = message.payload?.allOf ?? [message.payload];
  const own = parts.find((part) => part && part.properties && part.properties.type) ?? {};
  const topic = (message.tags ?? []).map((tag) => tag.name).find((name) => name.startsWith('topic:'))?.slice('topic:'.length);
  // A stream event is published on a topic; a few types are also sent directly, without `seq`.
  return { type: own.properties.type.const ?? message.name, data: own.properties.data, stream: topic !== undefined, topic };
}

function channelMessages(document, operation) {
  const channel = Object.values(document.channels ?? {})[0] ?? {};
  const refs = channel[operation]?.message?.oneOf ?? [];
  return refs.map((ref) => {
    const key = ref.$ref.slice('#/components/messages/'.length);
    const message = document.components.messages[key];
    if (!message) throw new Error(`message ${key} is not in components.messages`);
    return message;
  });
}

function dataMap(name, description, messages) {
  let text = comment(description, '');
  text += `export interface ${name} {\n`;
  for (const message of messages) {
    const parts = messageParts(message);
    text += comment(message.summary, '  ');
    text += `  ${propertyKey(parts.type)}: ${typeOf(parts.data, '  ')};\n`;
  }
  return `${text}}\n`;
}

function list(values) {
  return `[\n${values.map((value) => `  ${JSON.stringify(value)},\n`).join('')}]`;
}

/** src/events.generated.ts for `document`. */
export function renderEvents(document) {
  const schemas = document.components?.schemas ?? {};
  const serverMessages = channelMessages(document, 'subscribe');
  const clientMessages = channelMessages(document, 'publish');
  const streamTypes = serverMessages.map(messageParts).filter((parts) => parts.stream).map((parts) => parts.type);
  const eventTopics = serverMessages.map(messageParts).filter((parts) => parts.topic);
  const topics = (document.tags ?? [])
    .map((tag) => tag.name)
    .filter((name) => name.startsWith('topic:'))
    .map((name) => name.slice('topic:'.length));

  const sections = [
    `// Generated by scripts/generate-events.mjs from the gateway's AsyncAPI document\n` +
      `// (${document.id}, ${document.info?.title} ${document.info?.version}). Do not edit: run \`npm run generate\`.\n`,
    `/** What a connection may subscribe to, besides \`symbol:BASE/QUOTE\`. */\n` +
      `export const TOPICS = ${list(topics)} as const;\n\nexport type Topic = (typeof TOPICS)[number];\n`,
    ...Object.entries(schemas).map(([name, schema]) => declaration(name, schema)),
    dataMap('ServerEventDataMap', 'The `data` of each message the gateway sends, by `type`.', serverMessages),
    `export type ServerEventType = keyof ServerEventDataMap;\n`,
    `/** Every message type the gateway sends. */\n` +
      `export const SERVER_EVENT_TYPES = ${list(serverMessages.map((message) => messageParts(message).type))} as const satisfies readonly ServerEventType[];\n`,
    `/** The stream events: published on a topic, with \`seq\`, and replayed on resume (\`system_status\` and \`status_change\` also come directly, without \`seq\`). */\n` +
      `export const STREAM_EVENT_TYPES = ${list(streamTypes)} as const satisfies readonly ServerEventType[];\n\n` +
      `export type StreamEventType = (typeof STREAM_EVENT_TYPES)[number];\n`,
    `/** The topic each event is published on. */\n` +
      `export const EVENT_TOPICS: Readonly<Partial<Record<ServerEventType, Topic>>> = {\n` +
      eventTopics.map((parts) => `  ${propertyKey(parts.type)}: ${JSON.stringify(parts.topic)},\n`).join('') + `};\n`,
    dataMap('ClientMessageDataMap', 'The `data` of each message a client sends, by `type`.', clientMessages),
    `export type ClientMessageType = keyof ClientMessageDataMap;\n`,
  ];
  return sections.join('\n');
}

function main(args) {
  const inputIndex = args.indexOf('--input');
  const document = inputIndex >= 0
    ? JSON.parse(readFileSync(args[inputIndex + 1], 'utf8'))
    : loadDocument();
  const text = renderEvents(document);
  if (args.includes('--check')) {
    let current = '';
    try { current = readFileSync(GENERATED_PATH, 'utf8'); } catch { /* missing: stale */ }
    if (current !== text) {
      console.error('src/events.generated.ts is out of date with the gateway\'s AsyncAPI document: run `npm run generate`');
      process.exitCode = 1;
    }
    return;
  }
  writeFileSync(GENERATED_PATH, text);
  console.log(`wrote ${GENERATED_PATH}`);
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main(process.argv.slice(2));
}
