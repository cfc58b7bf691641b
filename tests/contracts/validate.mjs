// Parse API documents with their official parsers and print every diagnostic.
//
//   node tests/contracts/validate.mjs [--json] asyncapi docs/asyncapi.yaml [more files...]
//
// One line per diagnostic ("file:line:col severity code at path: message"), then one summary
// line per document; --json prints one JSON array of the results instead. Several files in one
// run pay the parser's start-up (about 2 s here) once. Exit status: 0 when every document parsed with no error and no warning,
// 1 when one did not, 2 on a usage error. Information and hints are printed but do not fail;
// tests/contracts/test_contracts.py asks for none at all on the project's own documents.
//
// A new kind of document (the status API's OpenAPI) is one more entry in KINDS.
import { resolve } from "node:path";
import { Parser, fromFile } from "@asyncapi/parser";

const SEVERITIES = ["error", "warning", "info", "hint"];

async function asyncapi(path) {
  // fromFile gives the parser the document's location, so relative $refs
  // (../worker/schemas/*.json) resolve against the document, not the working directory.
  const { document, diagnostics } = await fromFile(new Parser(), path).parse();
  return {
    parsed: document !== undefined,
    diagnostics: diagnostics.map((d) => ({
      severity: SEVERITIES[d.severity] ?? String(d.severity),
      code: String(d.code),
      path: d.path.join("."),
      line: (d.range?.start.line ?? -1) + 1,
      column: (d.range?.start.character ?? -1) + 1,
      message: d.message,
    })),
  };
}

const KINDS = { asyncapi };

async function validate(kind, file) {
  let result;
  try {
    result = await KINDS[kind](resolve(file));
  } catch (error) {
    // An unreadable file or a parser crash fails that document, not the whole run.
    result = {
      parsed: false,
      diagnostics: [
        { severity: "error", code: "exception", path: "", line: 0, column: 0, message: String(error) },
      ],
    };
  }
  const counts = Object.fromEntries(SEVERITIES.map((s) => [s, 0]));
  for (const d of result.diagnostics) counts[d.severity] = (counts[d.severity] ?? 0) + 1;
  const ok = result.parsed && counts.error === 0 && counts.warning === 0;
  return { kind, file, ok, ...result, counts };
}

function print(result) {
  for (const d of result.diagnostics) {
    const at = d.path ? ` at ${d.path}` : "";
    console.log(`${result.file}:${d.line}:${d.column} ${d.severity} ${d.code}${at}: ${d.message}`);
  }
  const summary = SEVERITIES.map((s) => `${result.counts[s]} ${s}`).join(", ");
  console.log(`${result.kind} ${result.file}: ${result.ok ? "ok" : "FAILED"} (${summary})`);
}

async function main(argv) {
  const json = argv[0] === "--json";
  const [kind, ...files] = json ? argv.slice(1) : argv;
  if (!Object.hasOwn(KINDS, kind) || files.length === 0) {
    console.error(`usage: validate.mjs [--json] {${Object.keys(KINDS).join("|")}} FILE...`);
    return 2;
  }
  const results = [];
  for (const file of files) results.push(await validate(kind, file));
  if (json) console.log(JSON.stringify(results, null, 1));
  else results.forEach(print);
  return results.every((r) => r.ok) ? 0 : 1;
}

process.exitCode = await main(process.argv.slice(2));
