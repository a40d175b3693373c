// Run codec probes under the MicroPython WebAssembly port and compare with CPython's outcomes.
//
// usage: node ring.mjs JOB.json
//
// JOB.json: {"probe": path of probe.py,
//            "families": {family: {"file": codec .mpy or .py, "probes": [...], "expected": [...]}}}
// Every codec file is written into MicroPython's in-memory filesystem as
// /ring/codec_<family>.<ext>, probe.py as /ring/ring_probe.py, and
// probe.main() runs the probes and compares them inside MicroPython.
//
// Prints the JSON report on stdout; anything the codecs print goes to stderr.
// Exit status: 0 every family matched, 1 a mismatch or a codec that failed
// to import, 2 the ring itself could not run (bad job, MicroPython error).
// (The package's own CLI always exits 0; this script is why `make test` can fail.)

import { readFileSync } from "node:fs";
import { extname } from "node:path";
import { loadMicroPython } from "@micropython/micropython-webassembly-pyscript";

const HEAP_BYTES = 64 * 1024 * 1024;
const PYSTACK_WORDS = 16 * 1024;

async function main(jobPath) {
  const job = JSON.parse(readFileSync(jobPath, "utf8"));
  const mp = await loadMicroPython({
    heapsize: HEAP_BYTES,
    pystack: PYSTACK_WORDS,
    stdout: (line) => process.stderr.write(`micropython: ${line}\n`),
    stderr: (line) => process.stderr.write(`micropython: ${line}\n`),
  });
  mp.FS.mkdir("/ring");
  mp.FS.writeFile("/ring/ring_probe.py", readFileSync(job.probe));
  const families = {};
  for (const [family, spec] of Object.entries(job.families)) {
    const module = `codec_${family}`;
    mp.FS.writeFile(`/ring/${module}${extname(spec.file)}`, readFileSync(spec.file));
    families[family] = { module, probes: spec.probes, expected: spec.expected };
  }
  mp.globals.set("RING_JOB", JSON.stringify({ families }));
  mp.runPython(
    "import sys\nsys.path.insert(0, '/ring')\nimport ring_probe\n" +
      "RING_REPORT = ring_probe.main(RING_JOB)\n",
  );
  const text = mp.globals.get("RING_REPORT");
  const report = JSON.parse(text);
  process.stdout.write(text + "\n");
  const failed = Object.values(report).some((r) => r.error || r.mismatches.length > 0);
  return failed ? 1 : 0;
}

if (process.argv.length !== 3) {
  process.stderr.write("usage: node ring.mjs JOB.json\n");
  process.exit(2);
}
try {
  process.exitCode = await main(process.argv[2]);
} catch (err) {
  process.stderr.write(`ring.mjs: ${err && err.stack ? err.stack : err}\n`);
  process.exitCode = 2;
}
