"""Data path cost (issue 13): prepare throughput against Hugging Face `datasets`, and how a
training rank's peak memory and its start-up time grow with the size of the prepared corpus.

    python scripts/bench_data.py [--rounds 3] [--quick] [--out bench_data.json]

Corpora are made from the built-in English corpus (`orchestrator.data.corpus.build_corpus()`):
its documents (the text split at blank lines, blank ones dropped, each stripped) are repeated,
every copy tagged `[copy k]` so no two documents are equal, and joined by blank lines, up to the
wanted size. Everything is written under a fresh directory in /tmp, deleted at the end.

1. Prepare throughput, tokens/s, on the same ~20 MB text file with the same tokenizer (a
   byte-level BPE of 4096 trained once on the built-in corpus with `BPETokenizer.train`):
   - ours: `orchestrator.data.prepare.prepare([file], fresh_dir, tokenizer_json, num_proc=2)`;
   - datasets: what a user of `datasets` does to get the same token ids on disk from the same
     file: `tokenizers.Tokenizer.from_file(tokenizer_json)`, `load_dataset("text",
     data_files=file, sample_by="paragraph", cache_dir=fresh_dir)` (it splits at blank lines as
     we do; building this Dataset counts in the datasets time, since a user starting from the
     text file has to), then `.map(batched=True, num_proc=2, remove_columns=["text"],
     cache_file_name=<fresh_dir>/tokens.arrow, load_from_cache_file=False)` with a function
     that calls `encode_batch` and appends end-of-text to each document, as ours does.
   Each contender runs in its own fresh interpreter (`--worker`), so neither inherits the
   other's state (e.g. `tokenizers` turning its threads off after a fork); the clock runs from
   just before the calls above to their return (imports and interpreter start excluded), and
   each round writes into a fresh directory, so both really rebuild. Both sides' token counts
   are recorded and must agree (the same documents and ids).
2. Peak RSS of a training rank with a ~20 MB vs a ~500 MB prepared corpus, and
3. launch-to-first-step wall time with a ~500 MB vs a ~5 MB prepared corpus: each corpus is
   prepared once (byte tokenizer, `action=prepare data.cache_dir=...`) before the timed rounds;
   then each round launches `python -m orchestrator +recipe=ddp data=text data.path=FILE
   data.cache_dir=DIR data.seq_len=64 train.steps=5 logging=none train.save_model=false` (2 gloo
   ranks on the CPU) once per corpus (5, 20 and 500 MB: one launch serves 2 and 3).
   Peak RSS: what the run records, per rank: `setup_peak_mem_bytes` of the "start" event (each
   rank's VmHWM up to its first step) and, for rank 0 only, each step record's
   `peak_mem_bytes` (VmHWM of the interval; the loop resets VmHWM through
   /proc/self/clear_refs at its start and after every logged step). Rank 1's steps are not
   recorded, so while the run goes this script also reads /proc/<pid>/status (VmHWM) of the two
   rank processes (the launcher's descendants whose environment holds RANK) every 20 ms. A
   rank's peak is the largest of these; the figure is the larger of the two ranks'.
   Launch to first step: from just before starting the command until metrics.jsonl holds its
   first step record (the file is polled every 20 ms; the records carry no timestamps).

Every contender runs once per round, rounds alternate the order (forward, then reversed), and
one process is measured at a time. Reported: medians over the rounds and the paired per-round
ratios (ours/datasets tokens/s, 500 MB/20 MB peak RSS, 500 MB/5 MB time to first step) against
the targets >= 1.0, <= 1.1 and <= 1.2. Results go to --out as JSON; a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MB = 1_000_000
MIB = 2**20
POLL_S = 0.02
BPE_VOCAB = 4096


# --- corpora ---------------------------------------------------------------------------------

def base_documents() -> list[str]:
    """The built-in corpus' documents, split at blank lines, blank ones dropped, stripped."""
    from orchestrator.data.corpus import build_corpus

    text = build_corpus().read_text(encoding="utf-8")
    return [d.strip() for d in text.split("\n\n") if d.strip()]


def write_corpus(path: Path, size: int, docs: list[str]) -> Path:
    """At least `size` bytes of the documents repeated, each copy tagged, blank-line separated."""
    written, copy = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size:
            block = "".join(f"[copy {copy}] {d}\n\n" for d in docs)
            f.write(block)
            written += len(block.encode("utf-8"))
            copy += 1
    return path


# --- 1. prepare throughput (each contender in its own interpreter) ---------------------------

def worker_ours(src: Path, tok: Path, out: Path) -> dict[str, Any]:
    from orchestrator.data.prepare import MANIFEST, prepare

    began = time.perf_counter()
    _, built = prepare([src], out, tok, num_proc=2, progress=False)
    seconds = time.perf_counter() - began
    assert built, f"{out} was not rebuilt"
    manifest = json.loads((out / MANIFEST).read_text())
    return {"seconds": seconds, "tokens": manifest["num_tokens"], "docs": manifest["num_docs"]}


def worker_datasets(src: Path, tok_path: Path, out: Path) -> dict[str, Any]:
    import datasets
    import pyarrow.compute as pc
    from tokenizers import Tokenizer

    datasets.disable_progress_bars()
    out.mkdir(parents=True)
    began = time.perf_counter()
    tok = Tokenizer.from_file(str(tok_path))
    eos = tok.token_to_id("<|endoftext|>")

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        return {"input_ids": [e.ids + [eos] for e in tok.encode_batch(batch["text"])]}

    ds = datasets.load_dataset("text", data_files=str(src), sample_by="paragraph",
                               split="train", cache_dir=str(out / "cache"))
    ds = ds.map(encode, batched=True, num_proc=2, remove_columns=["text"],
                keep_in_memory=False, load_from_cache_file=False,
                cache_file_name=str(out / "tokens.arrow"))
    seconds = time.perf_counter() - began
    tokens = pc.sum(pc.list_value_length(ds.data.column("input_ids"))).as_py()
    return {"seconds": seconds, "tokens": tokens, "docs": len(ds)}


def run_worker(kind: str, src: Path, tok: Path, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--src", str(src),
           "--tok", str(tok), "--dir", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    return result


# --- 2 and 3. training launches --------------------------------------------------------------

def descendants(root: int) -> list[int]:
    """The process ids under `root` (a scan of /proc: no `children` files here)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        kids = [c for c, p in parent.items() if p == pid]
        found += kids
        frontier += kids
    return found


def rank_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    except OSError:
        return None
    return int(env[b"RANK"]) if b"RANK" in env and b"LOCAL_RANK" in env else None


def vm_hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def train_cmd(corpus: Path, cache: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "orchestrator", "+recipe=ddp", "data=text",
            f"data.path={corpus}", f"data.cache_dir={cache}", "data.seq_len=64",
            "train.steps=5", "logging=none", "logging.progress=false",
            "train.save_model=false", f"hydra.run.dir={run_dir}"]


def launch(corpus: Path, cache: Path, run_dir: Path) -> dict[str, Any]:
    """One training launch, watched: time to its first step record, and its ranks' peaks."""
    metrics = run_dir / "metrics.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    log = open(run_dir.with_suffix(".log"), "w")  # noqa: SIM115 - closed below
    began = time.perf_counter()
    proc = subprocess.Popen(train_cmd(corpus, cache, run_dir), cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    first_step: float | None = None
    ranks: dict[int, int] = {}  # rank -> pid
    polled: dict[int, int] = {}  # rank -> largest VmHWM read
    try:
        while True:
            done = proc.poll() is not None
            now = time.perf_counter() - began
            if first_step is None and metrics.exists() and '"step"' in metrics.read_text():
                first_step = now
            if len(ranks) < 2 and not done:
                for pid in descendants(proc.pid):
                    r = rank_of(pid)
                    if r is not None:
                        ranks[r] = pid
            for r, pid in ranks.items():
                hwm = vm_hwm(pid)
                if hwm is not None:
                    polled[r] = max(polled.get(r, 0), hwm)
            if done:
                break
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
    wall = time.perf_counter() - began
    if proc.returncode:
        sys.exit(f"{' '.join(train_cmd(corpus, cache, run_dir))} failed (exit "
                 f"{proc.returncode}); see {run_dir.with_suffix('.log')}")
    from orchestrator.common.records import read_metrics

    steps = read_metrics(metrics)
    (start,) = [e for e in read_metrics(metrics, events=True) if e.get("event") == "start"]
    setup = start["setup_peak_mem_bytes"]
    step_peaks = [s["peak_mem_bytes"] for s in steps]
    recorded = [max([setup[r], *(step_peaks if r == 0 else [])]) for r in range(len(setup))]
    per_rank = [max(recorded[r], polled.get(r, 0)) for r in range(len(setup))]
    return {"first_step_s": first_step, "wall_s": wall, "setup_peak_bytes": setup,
            "rank0_step_peak_bytes": max(step_peaks), "recorded_peak_bytes": recorded,
            "polled_vmhwm_bytes": [polled.get(r) for r in range(len(setup))],
            "peak_bytes_per_rank": per_rank, "peak_bytes": max(per_rank),
            "rank0_recorded_peak_bytes": recorded[0]}


def prepare_once(corpus: Path, cache: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "orchestrator", "action=prepare", "data=text",
           f"data.path={corpus}", f"data.cache_dir={cache}", "data.num_proc=2",
           "logging.progress=false"]
    began = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - began
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    manifest = json.loads((cache / "manifest.json").read_text())
    return {"seconds": seconds, "tokens": manifest["num_tokens"], "docs": manifest["num_docs"],
            "token_bytes": (cache / "tokens.bin").stat().st_size}


# --- reporting -------------------------------------------------------------------------------

def med(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt_list(xs: list[float], digits: int = 3) -> str:
    return ", ".join(f"{x:.{digits}f}" for x in xs)


def table(res: dict[str, Any]) -> str:
    p, t, tg = res["prepare"], res["train"], res["targets"]
    rows = [
        "| measure | A | B | A / B per round | median A / B | target | met |",
        "|---|---|---|---|---|---|---|",
        f"| prepare tokens/s, {p['mb']:.0f} MB, BPE {BPE_VOCAB}, num_proc=2: A = ours, "
        f"B = `datasets` map | {med(p['ours_tps']):,.0f} | {med(p['datasets_tps']):,.0f} | "
        f"{fmt_list(p['ratios'])} | {med(p['ratios']):.3f} | >= 1.0 | "
        f"{'yes' if tg['prepare'] else 'no'} |",
        f"| peak RSS of a rank (MiB): A = {t['big_mb']:.0f} MB, B = {t['mid_mb']:.0f} MB "
        f"corpus | {med(t['peak_mib'][t['big']]):.1f} | {med(t['peak_mib'][t['mid']]):.1f} | "
        f"{fmt_list(t['rss_ratios'])} | {med(t['rss_ratios']):.3f} | <= 1.1 | "
        f"{'yes' if tg['rss'] else 'no'} |",
        f"| launch to first step (s): A = {t['big_mb']:.0f} MB, B = {t['small_mb']:.0f} MB "
        f"corpus | {med(t['first_step_s'][t['big']]):.2f} | "
        f"{med(t['first_step_s'][t['small']]):.2f} | {fmt_list(t['start_ratios'])} | "
        f"{med(t['start_ratios']):.3f} | <= 1.2 | {'yes' if tg['start'] else 'no'} |",
    ]
    detail = [
        "",
        "| corpus | tokens (bytes) | prepared once in (s) | peak RSS of a rank, MiB (median) "
        "| of it recorded, rank 0 (median) | launch to first step, s (median) "
        "| launch to exit, s (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in t["order"]:
        c = t["corpora"][name]
        detail.append(
            f"| {c['mb']:.0f} MB | {c['tokens']:,} | {c['prepare_s']:.1f} | "
            f"{med(t['peak_mib'][name]):.1f} | {med(t['rank0_recorded_mib'][name]):.1f} | "
            f"{med(t['first_step_s'][name]):.2f} | {med(t['wall_s'][name]):.2f} |")
    return "\n".join(rows + detail)


# --- main ------------------------------------------------------------------------------------

def bench_prepare(root: Path, docs: list[str], size: int, rounds: int) -> dict[str, Any]:
    from orchestrator.data.tokenizer import BPETokenizer

    src = write_corpus(root / "prepare.txt", size, docs)
    tok = root / "bpe.json"
    from orchestrator.data.corpus import build_corpus

    BPETokenizer.train(build_corpus(), BPE_VOCAB, tok)
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "datasets": []}
    for i in range(rounds):
        order = ["ours", "datasets"] if i % 2 == 0 else ["datasets", "ours"]
        for kind in order:
            out = root / f"prep-{kind}-{i}"
            r = run_worker(kind, src, tok, out)
            shutil.rmtree(out, ignore_errors=True)
            runs[kind].append(r)
            print(f"  prepare round {i + 1} {kind}: {r['seconds']:.2f} s, {r['tokens']:,} "
                  f"tokens, {r['tokens_per_s']:,.0f} tokens/s", flush=True)
    ours_tps = [r["tokens_per_s"] for r in runs["ours"]]
    ds_tps = [r["tokens_per_s"] for r in runs["datasets"]]
    same = all(a["tokens"] == b["tokens"] and a["docs"] == b["docs"]
               for a, b in zip(runs["ours"], runs["datasets"], strict=True))
    return {"mb": src.stat().st_size / MB, "bytes": src.stat().st_size, "runs": runs,
            "ours_tps": ours_tps, "datasets_tps": ds_tps, "same_tokens": same,
            "ratios": [a / b for a, b in zip(ours_tps, ds_tps, strict=True)]}


def bench_train(root: Path, docs: list[str], sizes: dict[str, int],
                rounds: int) -> dict[str, Any]:
    names = list(sizes)  # small, mid, big
    corpora: dict[str, dict[str, Any]] = {}
    for name in names:
        path = write_corpus(root / f"{name}.txt", sizes[name], docs)
        prep = prepare_once(path, root / f"cache-{name}")
        corpora[name] = {"path": str(path), "bytes": path.stat().st_size,
                         "mb": path.stat().st_size / MB, "prepare_s": prep["seconds"], **prep}
        print(f"  prepared {name}: {corpora[name]['mb']:.1f} MB, {prep['tokens']:,} tokens in "
              f"{prep['seconds']:.1f} s (action=prepare, byte tokenizer)", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for i in range(rounds):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            run_dir = root / f"run-{name}-{i}"
            r = launch(Path(corpora[name]["path"]), root / f"cache-{name}", run_dir)
            runs[name].append(r)
            print(f"  train round {i + 1} {name}: first step {r['first_step_s']:.2f} s, "
                  f"exit {r['wall_s']:.2f} s, peak RSS {r['peak_bytes'] / MIB:.1f} MiB "
                  f"(per rank {[round(b / MIB, 1) for b in r['peak_bytes_per_rank']]}; "
                  f"recorded {[round(b / MIB, 1) for b in r['recorded_peak_bytes']]}, "
                  f"polled {[round((b or 0) / MIB, 1) for b in r['polled_vmhwm_bytes']]})",
                  flush=True)
    small, mid, big = names
    peak = {n: [r["peak_bytes"] / MIB for r in runs[n]] for n in names}
    first = {n: [r["first_step_s"] for r in runs[n]] for n in names}
    return {"order": names, "small": small, "mid": mid, "big": big,
            "small_mb": corpora[small]["mb"], "mid_mb": corpora[mid]["mb"],
            "big_mb": corpora[big]["mb"], "corpora": corpora, "runs": runs, "peak_mib": peak,
            "rank0_recorded_mib": {n: [r["rank0_recorded_peak_bytes"] / MIB for r in runs[n]]
                                   for n in names},
            "first_step_s": first, "wall_s": {n: [r["wall_s"] for r in runs[n]] for n in names},
            "rss_ratios": [a / b for a, b in zip(peak[big], peak[mid], strict=True)],
            "start_ratios": [a / b for a, b in zip(first[big], first[small], strict=True)],
            "command": " ".join(train_cmd(Path("FILE"), Path("DIR"), Path("RUN_DIR"))[1:])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true",
                   help="a small smoke version: 2 MB prepare; 1, 2 and 20 MB corpora")
    p.add_argument("--out", default="bench_data.json", help="write the results as JSON here")
    p.add_argument("--worker", choices=["ours", "datasets"], help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--tok", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        work = worker_ours if args.worker == "ours" else worker_datasets
        print(json.dumps(work(Path(args.src), Path(args.tok), Path(args.dir))), flush=True)
        return
    if args.quick:
        prep_size, sizes = 2 * MB, {"5mb": 1 * MB, "20mb": 2 * MB, "500mb": 20 * MB}
    else:
        prep_size, sizes = 20 * MB, {"5mb": 5 * MB, "20mb": 20 * MB, "500mb": 500 * MB}
    began = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="bench_data_", dir="/tmp"))
    try:
        docs = base_documents()
        print(f"1. prepare throughput ({prep_size / MB:.0f} MB)", flush=True)
        prep = bench_prepare(root, docs, prep_size, args.rounds)
        print("2./3. training launches", flush=True)
        train = bench_train(root, docs, sizes, args.rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    targets = {"prepare": med(prep["ratios"]) >= 1.0, "rss": med(train["rss_ratios"]) <= 1.1,
               "start": med(train["start_ratios"]) <= 1.2}
    res = {"rounds": args.rounds, "quick": args.quick, "prepare": prep, "train": train,
           "targets": targets, "wall_s": time.perf_counter() - began,
           "python": sys.version.split()[0], "nproc": os.cpu_count()}
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print()
    print(table(res))
    if not prep["same_tokens"]:
        print("\nWARNING: ours and datasets produced different token or document counts")
    print(f"\ntotal wall time {res['wall_s']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
