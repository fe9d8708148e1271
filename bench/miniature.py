"""The miniature experiment, pre-registered: GRPO vs TAPO, TAPO's ablations, an oracle constructor
of set accuracy and a compute-matched GRPO, from the same cold-start checkpoint.

    .venv/bin/python bench/miniature.py --jobs 2            # the whole protocol (resumable)
    .venv/bin/python bench/miniature.py --plan              # write or check the protocol, list the runs
    .venv/bin/python bench/miniature.py --report-only       # tables and plots from the finished runs
    .venv/bin/python bench/miniature.py --steps 80 --amend "why"   # a change of protocol, recorded

Pre-registration. Before the first run the script writes its protocol (arms and their switches,
seeds, steps, data, evaluation, the statistics and the targets it will report, the initial
checkpoint's hash and the resolved per-run config) to ``<results>/miniature_protocol.json`` and its
text to ``<results>/miniature.md``. Later calls compare their protocol with the written one and stop
when they differ, unless ``--amend "reason"`` is given: the change is then listed, with its time, in
the results file's "changes of protocol after the first run". ``miniature.md`` is regenerated from the
runs by every call, never edited by hand.

Each (arm, seed) is one ordinary run of ``tapo_ds/main.py`` with ``configs/quickstart.yaml`` (every
hyper-parameter comes from there) plus the arm's switches. Held equal across arms: the initial model,
the training questions (one prefilter pass, shared), the data order and rollout seeds per seed (the
same ``seed``), B x K rollouts per step (except ``grpo_more_samples``, whose K is the point), the
number of optimizer steps, and the held-out evaluation (every ``--eval-every`` steps; the step-0 score
is measured once, it is the same model for all). A run that finished under the same command is not
run again; ``--jobs 2`` runs two side by side with one torch thread each.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from tapo_ds.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent

PY = sys.executable
CONFIG = ROOT / "configs" / "quickstart.yaml"
PROTOCOL_FILE = "miniature_protocol.json"
CONFIDENCE = 0.95

# ----------------------------------------------------------------------------- arms


@dataclass(frozen=True)
class Arm:
    name: str
    sets: tuple[str, ...]  # --set overrides on top of the quickstart config
    seeds: int
    group: str
    what: str


TAPO = ("algorithm.name=tapo", "tapo.loss_combination=pooled", "tapo.equal_reward_groups=zero")
ORACLE = ("tapo.constructor=synthetic_oracle",)
GROUPS = {
    "paper": "the paper's method, its baseline and its ablations",
    "oracle": "TAPO with the synthetic task's rule constructor, correction right with probability p",
    "beyond": "beyond the paper: equal-reward reflected groups get A = r (reported apart)",
    "control": "is TAPO just more samples? GRPO at TAPO's generated tokens per step",
}
ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("grpo", ("algorithm.name=grpo",), 5, "paper", "GRPO, the baseline"),
    Arm("tapo", TAPO, 5, "paper", "TAPO, the paper's defaults (pooled loss, DAE, OTS, negatives kept, micro)"),
    Arm("tapo_separate", TAPO + ("tapo.loss_combination=separate",), 3, "paper",
        "TAPO, mean over originals + lambda x mean over constructed"),
    Arm("no_dae", TAPO + ("tapo.decoupled_advantages=false",), 3, "paper", "TAPO without decoupled advantages"),
    Arm("no_ots", TAPO + ("tapo.ots=false",), 3, "paper", "TAPO without OTS token weights"),
    Arm("no_negative", TAPO + ("tapo.keep_failed_constructions=false",), 3, "paper",
        "TAPO without failed constructions"),
    Arm("full", TAPO + ("tapo.construction=full", "tapo.template=data/synthetic/construction_template_full.txt"),
        3, "paper", "TAPO with full reconstruction instead of micro-reflection"),
    Arm("oracle_p100", TAPO + ORACLE + ("tapo.oracle_accuracy=1.0",), 3, "oracle", "oracle constructor, p = 1.0"),
    Arm("oracle_p60", TAPO + ORACLE + ("tapo.oracle_accuracy=0.6",), 3, "oracle", "oracle constructor, p = 0.6"),
    Arm("oracle_p30", TAPO + ORACLE + ("tapo.oracle_accuracy=0.3",), 3, "oracle", "oracle constructor, p = 0.3"),
    Arm("tapo_equal_reward", TAPO + ("tapo.equal_reward_groups=reward",), 3, "beyond",
        "TAPO (self-construction), equal-reward groups A = r"),
    Arm("oracle_p100_equal_reward", TAPO + ORACLE + ("tapo.oracle_accuracy=1.0", "tapo.equal_reward_groups=reward"),
        3, "beyond", "oracle p = 1.0, equal-reward groups A = r"),
    Arm("opsd", ("algorithm.name=opsd", "opsd.privileged=solution"), 3, "paper",
        "OPSD, the paper's other competitor: distillation from the model shown the gold solution"),
    Arm("grpo_more_samples", ("algorithm.name=grpo",), 3, "control",
        "GRPO with K' samples per question (K' by the rule below, after `tapo` and `grpo` ran)"),
)}
MORE_SAMPLES = "grpo_more_samples"
K_RULE = ("K' = round(T_tapo / (B x L_grpo)), at least K: T_tapo = mean over the `tapo` runs and their steps of "
          "the generated tokens per step (B x K x rollout/response_len_mean + tapo/generated_tokens, the policy's "
          "construction outputs); L_grpo = mean over the `grpo` runs and their steps of rollout/response_len_mean; "
          "computed from those runs once every seed of both arms finished")
STATISTICS = [
    "per arm: held-out pass@1 and pass@5 at the last step, mean over seeds and its 95% confidence interval "
    "(t-distribution, n - 1 degrees of freedom)",
    "paired by seed: TAPO - GRPO (the seeds both ran), each ablation - TAPO, oracle_p100 - GRPO, OPSD - GRPO, "
    "TAPO - OPSD; mean and 95% t interval",
    "pass@1 versus step for every arm (mean over seeds; step 0 is the shared score), one PNG",
    "training dynamics per arm (mean over seeds): tapo/ots_weight_mean, tapo/construction_acc, "
    "rollout/response_len_mean, actor/entropy, one PNG",
]
TARGETS = [
    "headline: TAPO - GRPO paired pass@1 difference > 0 with its 95% interval above 0",
    "ablations move in the paper's direction: no_dae, no_ots, no_negative, full each below TAPO (mean paired difference < 0)",
    "constructions inside the `tapo` runs (mean over runs and steps): parse_success >= 0.95, construction_acc in "
    "[0.30, 0.75], prefix_fidelity >= 0.9, reflected_mixed_frac >= 0.5",
    "regime: step-0 held-out pass@1 in [0.30, 0.55]",
]
PAPER_ABLATIONS = ("no_dae", "no_ots", "no_negative", "full")
DYNAMICS = ("tapo/ots_weight_mean", "tapo/construction_acc", "rollout/response_len_mean", "actor/entropy")


def arm_seeds(arm: Arm, cap: int | None) -> list[int]:
    return list(range(1, (arm.seeds if cap is None else min(arm.seeds, cap)) + 1))


# ----------------------------------------------------------------------------- the protocol


def file_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        if not p.is_file():
            raise SystemExit(f"protocol: {p}: no such file")
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def checkpoint_digest(path: Path) -> str:
    if not path.is_dir():
        raise SystemExit(f"model.path: {path}: no such folder (the initial checkpoint)")
    return file_digest(sorted(p for p in path.iterdir() if p.is_file()))


def eval_set(cfg: Config) -> tuple[str, str]:
    if len(cfg.evaluation.files) != 1:
        raise SystemExit(f"{CONFIG}: evaluation.files: expected one held-out set, got {sorted(cfg.evaluation.files)}")
    return next(iter(cfg.evaluation.files.items()))


def build_protocol(a: argparse.Namespace, cfg: Config) -> dict:
    e = cfg.evaluation
    set_name, set_file = eval_set(cfg)
    return {
        "initial_checkpoint": {"path": cfg.model.path, "sha256": checkpoint_digest(ROOT / cfg.model.path)},
        "config": str(CONFIG.relative_to(ROOT)),
        "steps": a.steps,
        "data": {"train_file": cfg.data.train_files[0], "train_sha256": file_digest([ROOT / cfg.data.train_files[0]]),
                 "questions": a.questions,
                 "prefilter": {"samples": cfg.prefilter.samples, "keep_pass_rate": [cfg.prefilter.low,
                                                                                     cfg.prefilter.high]},
                 "shared": "one prefilter pass with the initial checkpoint; every arm and seed trains on its output"},
        "evaluation": {"set": set_name, "file": set_file, "sha256": file_digest([ROOT / set_file]),
                       "problems": a.eval_limit, "samples": e.samples,
                       "ks": list(e.ks), "temperature": e.temperature, "top_p": e.top_p,
                       "max_new_tokens": e.max_new_tokens, "every": a.eval_every},
        "arms": {name: {"sets": list(arm.sets), "seeds": arm_seeds(arm, a.seeds), "group": arm.group,
                        "what": arm.what} for name, arm in ARMS.items() if name in a.arms},
        "derived": {MORE_SAMPLES: K_RULE},
        "statistics": STATISTICS,
        "targets": TARGETS,
        "run_config": cfg.to_dict(),
    }


def flatten(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def protocol_diff(old: dict, new: dict) -> dict[str, list]:
    """key path -> [old value, new value] for every leaf that differs (None where absent)."""
    fo, fn = flatten(old), flatten(new)
    return {k: [fo.get(k), fn.get(k)] for k in sorted(set(fo) | set(fn)) if fo.get(k) != fn.get(k)}


def lock_protocol(path: Path, protocol: dict, amend: str | None, now: str) -> dict:
    """The protocol in force: written on the first call; later ones must match it or say why they differ.

    Returns the stored record ({"written": ..., "protocol": ..., "changes": [...]})."""
    if not path.is_file():
        if amend:
            raise SystemExit(f"--amend: there is no protocol to amend yet ({path})")
        record = {"written": now, "protocol": protocol, "changes": []}
        path.write_text(json.dumps(record, indent=2) + "\n")
        return record
    record = json.loads(path.read_text())
    diff = protocol_diff(record["protocol"], protocol)
    if not diff:
        if amend:
            raise SystemExit(f"--amend: the arguments match the protocol of {path}; nothing to amend")
        return record
    if not amend:
        shown = "; ".join(f"{k}: {json.dumps(o)} -> {json.dumps(n)}" for k, (o, n) in list(diff.items())[:8])
        more = f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""
        raise SystemExit(f"protocol: these arguments differ from the protocol written in {path}: {shown}{more}. "
                         f"Run with the recorded arguments, or pass --amend \"reason\" to change the protocol "
                         f"(the change is listed in the results)")
    record["changes"].append({"at": now, "reason": amend, "changed": diff})
    record["protocol"] = protocol
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record


# ----------------------------------------------------------------------------- statistics


@functools.lru_cache(maxsize=None)
def t_quantile(q: float, df: int) -> float:
    """The q-quantile (q > 0.5) of Student's t with ``df`` degrees of freedom: bisection on its CDF,
    the density integrated by Simpson's rule (exact to ~1e-6 where it is used)."""
    if df < 1 or not 0.5 < q < 1:
        raise ValueError(f"t_quantile: needs df >= 1 and 0.5 < q < 1, got df={df}, q={q}")
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(t: float, n: int = 1000) -> float:
        h = t / n
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 1.0
    while cdf(hi) < q:
        hi *= 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: list[float], confidence: float = CONFIDENCE) -> dict:
    """Mean and its two-sided t interval; one value gives no interval (half-width None)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci: no values")
    m = statistics.mean(values)
    if n == 1:
        return {"n": 1, "mean": m, "half": None, "low": None, "high": None}
    half = t_quantile(0.5 + confidence / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return {"n": n, "mean": m, "half": half, "low": m - half, "high": m + half}


def paired(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """a - b over the seeds both have: mean and t interval of the differences; None if no seed is shared."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    return {"seeds": seeds, "diffs": [a[s] - b[s] for s in seeds], **mean_ci([a[s] - b[s] for s in seeds])}


# ----------------------------------------------------------------------------- running


def run_main(args: list[str], log: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    with log.open("w") as fh:
        proc = subprocess.run([PY, str(ROOT / "tapo_ds" / "main.py"), "--config", str(CONFIG)] + args,
                              cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"run failed ({proc.returncode}); see {log}")


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def series(rows: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in rows if key in r}


class Runner:
    """Runs the shared prefilter and step-0 evaluation, then (arm, seed) runs; skips what finished."""

    def __init__(self, a: argparse.Namespace, protocol: dict, cfg: Config):
        self.a, self.p, self.cfg = a, protocol, cfg
        self.out: Path = a.out
        self.set_name = protocol["evaluation"]["set"]
        ev = protocol["evaluation"]
        self.common = [f"--set=output_dir={self.out}", f"--set=total_steps={protocol['steps']}",
                       "--set=logging.progress_bar=false", "--set=checkpoint.every=0",
                       "--set=checkpoint.export_hf=false", f"--set=evaluation.limit={ev['problems']}"]
        self.threads = ["--set=torch_threads=1"] if a.jobs > 1 else []

    @property
    def filtered(self) -> Path:
        return self.out / "prefilter" / "filtered.jsonl"

    @property
    def train(self) -> str:
        return f"--set=data.train_files=[{self.filtered}]"

    def fingerprint(self, args: list[str]) -> str:
        """What a run's outcome depends on: its arguments, the initial checkpoint, the resolved config, the
        data and the evaluation; a run whose fingerprint changed (e.g. after an amendment) is run again."""
        p = self.p
        key = [args, p["initial_checkpoint"], p["run_config"], p["data"], p["evaluation"]]
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def done(self, name: str, args: list[str]) -> bool:
        """``name`` finished under ``args`` and the protocol's inputs, and left its marker."""
        marker = self.out / f"{name}.run.json"
        return marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == self.fingerprint(args)

    def launch(self, name: str, args: list[str], extra_launch: list[str] = ()) -> None:
        """Run ``tapo_ds/main.py`` (from scratch: an unfinished run starts over) and leave the marker."""
        t0 = time.time()
        run_main(args + list(extra_launch) + ["--set=overwrite=true"], self.out / f"{name}.log")
        wall = time.time() - t0
        (self.out / f"{name}.run.json").write_text(json.dumps(
            {"args": args, "fingerprint": self.fingerprint(args), "wall_s": wall}, indent=2))
        print(f"  {name}: {wall:.0f} s", flush=True)

    def prefilter(self) -> None:
        args = self.common + ["--set=stage=prefilter", "--set=name=prefilter",
                              f"--set=data.limit={self.p['data']['questions']}"]
        if not (self.done("prefilter", args) and self.filtered.is_file()):
            print(f"prefilter: {self.p['data']['questions']} questions with the initial checkpoint", flush=True)
            self.launch("prefilter", args)

    def step0(self) -> None:
        """The shared "before RL" score: one step at lr 0 with the evaluation at its start."""
        args = self.common + [self.train, "--set=name=step0", "--set=total_steps=1", "--set=optimizer.lr=0.0",
                              "--set=evaluation.at_start=true", "--set=evaluation.every=0"]
        if not (self.done("step0", args) and 0 in series(read_rows(self.out / "step0"), self.pass1)):
            self.launch("step0", args)

    @property
    def pass1(self) -> str:
        return f"eval/{self.set_name}/pass@1"

    def run_args(self, arm: str, seed: int, extra: tuple[str, ...] = ()) -> list[str]:
        return (self.common + [self.train, f"--set=name={arm}-s{seed}", f"--set=seed={seed}",
                               "--set=evaluation.at_start=false", f"--set=evaluation.every={self.p['evaluation']['every']}"]
                + [f"--set={s}" for s in self.p["arms"][arm]["sets"] + list(extra)])

    def finished(self, name: str, args: list[str]) -> bool:
        return self.done(name, args) and self.p["steps"] in series(read_rows(self.out / name), self.pass1)

    def current(self, arm: str, seed: int) -> bool:
        """The run finished under the protocol in force (for K', with the K' its inputs give now)."""
        extra = ()
        if arm == MORE_SAMPLES:
            derived = self.more_samples_k()
            if derived is None:
                return False
            extra = (f"rollout.samples_per_question={derived['K']}",)
        return self.finished(f"{arm}-s{seed}", self.run_args(arm, seed, extra))

    def one(self, arm: str, seed: int, extra: tuple[str, ...] = ()) -> None:
        name, args = f"{arm}-s{seed}", self.run_args(arm, seed, extra)
        if not self.finished(name, args):
            self.launch(name, args, self.threads)  # threads: how it runs (and its rounding), not the experiment

    def runs(self, arms: list[str], extra: tuple[str, ...] = ()) -> None:
        jobs = [(arm, seed) for arm in arms for seed in self.p["arms"][arm]["seeds"]]
        with ThreadPoolExecutor(max_workers=self.a.jobs) as pool:
            list(pool.map(lambda j: self.one(*j, extra=extra), jobs))  # list(): a failed run raises here

    def k_inputs_missing(self) -> list[str]:
        """The `tapo` and `grpo` runs K' still waits for (a pure function of them: recomputed, not cached,
        so a run redone after an amendment cannot leave a stale K')."""
        if not {"tapo", "grpo"} <= set(self.p["arms"]):
            return ["the arms `tapo` and `grpo` themselves"]
        return [f"{arm}-s{s}" for arm in ("tapo", "grpo") for s in self.p["arms"][arm]["seeds"]
                if not self.current(arm, s)]

    def more_samples_k(self) -> dict | None:
        """K' of ``grpo_more_samples`` by the protocol's rule; None while its inputs are missing."""
        return None if self.k_inputs_missing() else derive_more_samples_k(self.out, self.p, self.cfg)


def derive_more_samples_k(out: Path, protocol: dict, cfg: Config) -> dict:
    B, K = cfg.rollout.questions_per_step, cfg.rollout.samples_per_question
    tapo_tokens, grpo_len = [], []
    for s in protocol["arms"]["tapo"]["seeds"]:
        rows = read_rows(out / f"tapo-s{s}")
        tapo_tokens += [B * K * r["rollout/response_len_mean"] + r.get("tapo/generated_tokens", 0.0)
                        for r in rows if "rollout/response_len_mean" in r]
    for s in protocol["arms"]["grpo"]["seeds"]:
        grpo_len += [r["rollout/response_len_mean"] for r in read_rows(out / f"grpo-s{s}")
                     if "rollout/response_len_mean" in r]
    t, length = statistics.mean(tapo_tokens), statistics.mean(grpo_len)
    return {"K": max(K, round(t / (B * length))), "T_tapo": t, "L_grpo": length, "B": B, "K_base": K}


# ----------------------------------------------------------------------------- results


def collect(out: Path, protocol: dict, current: Callable[[str, int], bool] | None = None) -> dict:
    """Per run: last-step pass@1/pass@5, the pass@1 curve and the dynamics; the shared step-0 score.

    ``current(arm, seed)``: whether the run finished under the protocol in force (None: every run that
    left its marker and reached the last step counts)."""
    set_name = protocol["evaluation"]["set"]
    k_hi = max(protocol["evaluation"]["ks"])
    step0 = series(read_rows(out / "step0"), f"eval/{set_name}/pass@1").get(0)
    runs = {}
    for arm, spec in protocol["arms"].items():
        for seed in spec["seeds"]:
            name = f"{arm}-s{seed}"
            marker, rows = out / f"{name}.run.json", read_rows(out / name)
            curve = series(rows, f"eval/{set_name}/pass@1")
            if not marker.is_file() or protocol["steps"] not in curve or (current and not current(arm, seed)):
                continue
            runs[name] = {"arm": arm, "seed": seed, "pass@1": curve[protocol["steps"]],
                          f"pass@{k_hi}": series(rows, f"eval/{set_name}/pass@{k_hi}")[protocol["steps"]],
                          "curve": curve, "dynamics": {k: series(rows, k) for k in DYNAMICS},
                          "constructions": {k: series(rows, k) for k in CONSTRUCTION_KEYS},
                          "wall_s": json.loads(marker.read_text())["wall_s"]}
    return {"step0": step0, "k_hi": k_hi, "runs": runs}


CONSTRUCTION_KEYS = ("tapo/parse_success", "tapo/construction_acc", "tapo/prefix_fidelity", "tapo/reflected_mixed_frac",
                     "tapo/generated_tokens")


def per_arm(collected: dict, key: str) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for r in collected["runs"].values():
        out.setdefault(r["arm"], {})[r["seed"]] = r[key]
    return out


def analyse(collected: dict, protocol: dict) -> dict:
    k_hi = collected["k_hi"]
    p1, pk = per_arm(collected, "pass@1"), per_arm(collected, f"pass@{k_hi}")
    arms = {arm: {"pass@1": mean_ci(list(p1[arm].values())), f"pass@{k_hi}": mean_ci(list(pk[arm].values())),
                  "per_seed": p1[arm]} for arm in protocol["arms"] if arm in p1}
    pairs = {}
    if "tapo" in p1 and "grpo" in p1:
        pairs["tapo - grpo"] = paired(p1["tapo"], p1["grpo"])
    for arm in PAPER_ABLATIONS + ("tapo_separate",):
        if arm in p1 and "tapo" in p1:
            pairs[f"{arm} - tapo"] = paired(p1[arm], p1["tapo"])
    if "oracle_p100" in p1 and "grpo" in p1:
        pairs["oracle_p100 - grpo"] = paired(p1["oracle_p100"], p1["grpo"])
    if "opsd" in p1 and "grpo" in p1:
        pairs["opsd - grpo"] = paired(p1["opsd"], p1["grpo"])
    if "tapo" in p1 and "opsd" in p1:
        pairs["tapo - opsd"] = paired(p1["tapo"], p1["opsd"])
    constructions: dict[str, dict[str, float]] = {}
    for arm in protocol["arms"]:
        for key in CONSTRUCTION_KEYS:
            values = [v for r in collected["runs"].values() if r["arm"] == arm for v in r["constructions"][key].values()]
            if values:
                constructions.setdefault(arm, {})[key] = statistics.mean(values)
    return {"arms": arms, "pairs": {k: v for k, v in pairs.items() if v is not None}, "constructions": constructions}


def targets(stats: dict, step0: float | None) -> list[tuple[str, str]]:
    """(target, verdict) for each pre-registered target; "not measured" where its runs are missing."""
    out = []
    d = stats["pairs"].get("tapo - grpo")
    if d is None:
        out.append((TARGETS[0], "not measured"))
    elif d["low"] is None:
        out.append((TARGETS[0], f"not decidable with one seed (difference {100 * d['mean']:+.1f})"))
    else:
        out.append((TARGETS[0], f"{'met' if d['low'] > 0 else 'not met'}: {fmt_ci(d, signed=True)}"))
    moves = [(a, stats["pairs"].get(f"{a} - tapo")) for a in PAPER_ABLATIONS]
    moves = [(a, d) for a, d in moves if d is not None]
    if not moves:
        out.append((TARGETS[1], "not measured"))
    else:
        below = [a for a, d in moves if d["mean"] < 0]
        if len(moves) < len(PAPER_ABLATIONS):
            verdict = f"incomplete ({len(moves)} of {len(PAPER_ABLATIONS)} measured, {len(below)} below TAPO)"
        else:
            verdict = "met" if len(below) == len(moves) else f"not met ({len(below)} of {len(moves)} below TAPO)"
        out.append((TARGETS[1], f"{verdict}: " + ", ".join(f"{a} {100 * d['mean']:+.1f}" for a, d in moves)))
    c = stats["constructions"].get("tapo", {})
    if not c:
        out.append((TARGETS[2], "not measured"))
    else:
        checks = {"tapo/parse_success": lambda v: v >= 0.95, "tapo/construction_acc": lambda v: 0.30 <= v <= 0.75,
                  "tapo/prefix_fidelity": lambda v: v >= 0.9, "tapo/reflected_mixed_frac": lambda v: v >= 0.5}
        parts = [f"{k.split('/')[1]} {c[k]:.2f} ({'ok' if checks[k](c[k]) else 'missed'})" for k in checks if k in c]
        met = all(k in c and checks[k](c[k]) for k in checks)
        out.append((TARGETS[2], f"{'met' if met else 'not met'}: " + ", ".join(parts)))
    if step0 is None:
        out.append((TARGETS[3], "not measured"))
    else:
        out.append((TARGETS[3], f"{'met' if 0.30 <= step0 <= 0.55 else 'not met'}: {100 * step0:.1f}%"))
    return out


def fmt_ci(s: dict, signed: bool = False) -> str:
    m = f"{100 * s['mean']:+.1f}" if signed else f"{100 * s['mean']:.1f}"
    if s["half"] is None:
        return f"{m} (n=1, no interval)"
    return f"{m} [{100 * s['low']:.1f}, {100 * s['high']:.1f}] (n={s['n']})"


# ----------------------------------------------------------------------------- the results file


def protocol_text(record: dict) -> list[str]:
    p = record["protocol"]
    rc, ev, data = p["run_config"], p["evaluation"], p["data"]
    ro, opt = rc["rollout"], rc["optimizer"]
    lines = [
        f"## Protocol (written {record['written']}, before the first run)", "",
        f"- initial checkpoint: `{p['initial_checkpoint']['path']}` (sha256 {p['initial_checkpoint']['sha256'][:16]}...)",
        f"- per-run settings: `{p['config']}` (B={ro['questions_per_step']}, K={ro['samples_per_question']}, "
        f"T={ro['temperature']}, max {ro['max_new_tokens']} new tokens, lr {opt['lr']}, "
        f"{rc['algorithm']['micro_batch_size']} sequences per micro-batch), {p['steps']} optimizer steps per run",
        f"- data: the first {data['questions']} questions of `{data['train_file']}` "
        f"(sha256 {data['train_sha256'][:16]}...), "
        f"{data['prefilter']['samples']} samples each with the initial checkpoint, kept at pass rate in "
        f"{data['prefilter']['keep_pass_rate']}; {data['shared']}",
        f"- evaluation: `{ev['file']}` (sha256 {ev['sha256'][:16]}...), {ev['problems'] or 'all'} problems x "
        f"{ev['samples']} samples, "
        f"T={ev['temperature']}, top-p {ev['top_p']}, max {ev['max_new_tokens']} new tokens, every {ev['every']} "
        f"steps; pass@k by the unbiased estimator",
        "- held equal across arms: initial model, prefiltered questions, data order and rollout seeds per seed, "
        "B x K rollouts (except the control arm), optimizer steps, evaluation", "",
        "| arm | group | seeds | what | switches on top of the config |", "|---|---|---|---|---|",
    ]
    for name, arm in p["arms"].items():
        lines.append(f"| {name} | {arm['group']} | {', '.join(map(str, arm['seeds']))} | {arm['what']} | "
                     f"{', '.join(f'`{s}`' for s in arm['sets'])} |")
    lines += ["", "Groups: " + "; ".join(f"**{g}**: {w}" for g, w in GROUPS.items()), "",
              f"Derived setting: `{MORE_SAMPLES}`: {p['derived'][MORE_SAMPLES]}.", "", "Statistics reported:"]
    lines += [f"- {s}" for s in p["statistics"]] + ["", "Targets:"] + [f"- {t}" for t in p["targets"]]
    lines += ["", "## Changes of protocol after the first run", ""]
    if not record["changes"]:
        lines.append("None.")
    for c in record["changes"]:
        changed = "; ".join(f"`{k}`: {json.dumps(o)} -> {json.dumps(n)}" for k, (o, n) in c["changed"].items())
        lines.append(f"- {c['at']}: {c['reason']} ({changed})")
    return lines


def results_text(collected: dict, stats: dict, derived: dict | None, protocol: dict) -> list[str]:
    k_hi = collected["k_hi"]
    runs = collected["runs"]
    expected = sum(len(a["seeds"]) for a in protocol["arms"].values())
    step0 = collected["step0"]
    lines = ["", "## Results", "",
             f"{len(runs)} of {expected} runs finished. Held-out pass@1 before RL (step 0, shared): "
             + (f"{100 * step0:.1f}%." if step0 is not None else "not measured yet.")]
    if derived:
        lines.append(f"`{MORE_SAMPLES}`: K' = {derived['K']} (T_tapo = {derived['T_tapo']:.0f} tokens per step, "
                     f"L_grpo = {derived['L_grpo']:.1f}, B = {derived['B']}, K = {derived['K_base']}).")
    if runs:
        hours = sum(r["wall_s"] for r in runs.values()) / 3600
        lines.append(f"Run time summed over finished runs: {hours:.2f} h.")
    for group, what in GROUPS.items():
        arms = [a for a, spec in protocol["arms"].items() if spec["group"] == group and a in stats["arms"]]
        if not arms:
            continue
        lines += ["", f"### {group}: {what}", "",
                  f"| arm | pass@1 mean [95% CI] | pass@{k_hi} mean [95% CI] | pass@1 per seed |", "|---|---|---|---|"]
        for arm in arms:
            s = stats["arms"][arm]
            per_seed = ", ".join(f"s{seed} {100 * v:.1f}" for seed, v in sorted(s["per_seed"].items()))
            lines.append(f"| {arm} | {fmt_ci(s['pass@1'])} | {fmt_ci(s[f'pass@{k_hi}'])} | {per_seed} |")
    if stats["pairs"]:
        lines += ["", "### Paired differences of pass@1 (same seed), points", "",
                  "| difference | mean [95% CI] | per seed |", "|---|---|---|"]
        for name, d in stats["pairs"].items():
            per_seed = ", ".join(f"s{s} {100 * v:+.1f}" for s, v in zip(d["seeds"], d["diffs"]))
            lines.append(f"| {name} | {fmt_ci(d, signed=True)} | {per_seed} |")
    if stats["constructions"]:
        lines += ["", "### Constructions (mean over runs and steps)", "",
                  "| arm | parse_success | construction_acc | prefix_fidelity | reflected_mixed_frac | "
                  "generated tokens per step |", "|---|---|---|---|---|---|"]
        for arm, c in stats["constructions"].items():
            cells = [f"{c[k]:.2f}" if k in c else "-" for k in CONSTRUCTION_KEYS[:-1]]
            tokens = f"{c['tapo/generated_tokens']:.0f}" if "tapo/generated_tokens" in c else "-"
            lines.append(f"| {arm} | {' | '.join(cells)} | {tokens} |")
    lines += ["", "### Targets", "", "| target | verdict |", "|---|---|"]
    lines += [f"| {t} | {v} |" for t, v in targets(stats, step0)]
    lines += ["", "![pass@1 versus step](miniature_pass_at_1.png)", "",
              "![training dynamics](miniature_dynamics.png)"]
    return lines


def write_report(results_dir: Path, record: dict, collected: dict, derived: dict | None, command: str) -> dict:
    protocol = record["protocol"]
    stats = analyse(collected, protocol)
    head = ["# The miniature experiment, pre-registered", "",
            "Regenerated by `bench/miniature.py` from its runs; not edited by hand.", "",
            f"Command: `{command}`", ""]
    text = head + protocol_text(record) + results_text(collected, stats, derived, protocol)
    (results_dir / "miniature.md").write_text("\n".join(text) + "\n")
    (results_dir / "miniature.json").write_text(json.dumps(
        {"step0": collected["step0"], "derived": derived, "stats": stats,
         "runs": {n: {k: v for k, v in r.items() if k not in ("dynamics", "constructions")}
                  for n, r in collected["runs"].items()}}, indent=2) + "\n")
    curves, dynamics = results_dir / "miniature_pass_at_1.png", results_dir / "miniature_dynamics.png"
    if collected["runs"]:
        plot_curves(collected, protocol, curves)
        plot_dynamics(collected, protocol, dynamics)
    else:  # no run of this protocol yet: an earlier experiment's plots must not pass for its results
        curves.unlink(missing_ok=True)
        dynamics.unlink(missing_ok=True)
    return stats


def mean_over_seeds(curves: list[dict[int, float]]) -> tuple[list[int], list[float]]:
    steps = sorted(set().union(*curves))
    return steps, [statistics.mean(c[s] for c in curves if s in c) for s in steps]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _arm_styles(protocol: dict) -> dict[str, dict]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab20")
    styles = {}
    for i, (arm, spec) in enumerate(protocol["arms"].items()):
        # tab20 pairs a dark and a light shade: the dark ones first, so neighbouring arms differ
        styles[arm] = {"color": cmap((2 * i) % 20 + (2 * i) // 20 % 2), "linestyle": {"paper": "-", "oracle": "--", "beyond": ":",
                                                             "control": "-."}[spec["group"]]}
    return styles


def plot_curves(collected: dict, protocol: dict, path: Path) -> None:
    plt = _pyplot()
    styles = _arm_styles(protocol)
    fig, ax = plt.subplots(figsize=(8, 5))
    for arm in protocol["arms"]:
        curves = [dict(r["curve"]) for r in collected["runs"].values() if r["arm"] == arm]
        if not curves:
            continue
        if collected["step0"] is not None:
            for c in curves:
                c.setdefault(0, collected["step0"])
        steps, means = mean_over_seeds(curves)
        ax.plot(steps, [100 * m for m in means], marker="o", ms=3, label=f"{arm} (n={len(curves)})", **styles[arm])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out pass@1 (%), mean over seeds")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_dynamics(collected: dict, protocol: dict, path: Path) -> None:
    plt = _pyplot()
    styles = _arm_styles(protocol)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, key in zip(axes.flat, DYNAMICS):
        for arm in protocol["arms"]:
            curves = [r["dynamics"][key] for r in collected["runs"].values() if r["arm"] == arm and r["dynamics"][key]]
            if curves:
                steps, means = mean_over_seeds(curves)
                ax.plot(steps, means, lw=1, label=arm, **styles[arm])
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[2].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=6)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None, cfg: Config) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="the protocol's arms")
    p.add_argument("--seeds", type=int, default=None, help="at most N seeds per arm (seeds 1..N); default: the "
                                                            "arm's own count (5 for grpo and tapo, 3 for the others)")
    p.add_argument("--steps", type=int, default=cfg.total_steps)
    p.add_argument("--questions", type=int, default=400, help="training questions given to the prefilter")
    p.add_argument("--eval-limit", type=int, default=cfg.evaluation.limit, help="held-out problems (0 = all)")
    p.add_argument("--eval-every", type=int, default=cfg.evaluation.every)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "miniature-runs",
                   help="the runs (their metrics, configs and markers are kept in the repository)")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results", help="protocol, tables and plots")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side (each then uses 1 torch thread)")
    p.add_argument("--only", nargs="+", default=None, choices=list(ARMS),
                   help="run only these arms of the protocol now (the report covers every finished run)")
    p.add_argument("--amend", default=None, metavar="REASON", help="change the written protocol, recorded")
    p.add_argument("--plan", action="store_true", help="write or check the protocol, list the runs, run nothing")
    p.add_argument("--report-only", action="store_true", help="regenerate the results from finished runs")
    a = p.parse_args(argv)
    if a.steps < 1 or a.eval_every < 1 or a.steps % a.eval_every:
        p.error(f"--steps {a.steps} must be a positive multiple of --eval-every {a.eval_every} "
                f"(the last step is evaluated)")
    if a.seeds is not None and a.seeds < 1:
        p.error("--seeds: at least 1")
    if a.only and set(a.only) - set(a.arms):
        p.error(f"--only: {sorted(set(a.only) - set(a.arms))} are not among --arms")
    return a


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(CONFIG)
    a = parse_args(argv, cfg)
    a.out, a.results = a.out.resolve(), a.results.resolve()
    a.results.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record = lock_protocol(a.results / PROTOCOL_FILE, build_protocol(a, cfg), a.amend, now)
    protocol = record["protocol"]
    command = "bench/miniature.py " + " ".join(sys.argv[1:] if argv is None else argv)
    a.out.mkdir(parents=True, exist_ok=True)
    runner = Runner(a, protocol, cfg)

    def report() -> dict:
        derived = runner.more_samples_k() if MORE_SAMPLES in protocol["arms"] else None
        return write_report(a.results, record, collect(a.out, protocol, runner.current), derived, command)

    report()  # the protocol is in the results file before any run starts
    todo = [arm for arm in protocol["arms"] if a.only is None or arm in a.only]
    if a.plan:
        for arm in todo:
            seeds = protocol["arms"][arm]["seeds"]
            done = sum(runner.current(arm, s) for s in seeds)
            print(f"{arm:26s} seeds {seeds}  finished {done}/{len(seeds)}")
        return
    if not a.report_only:
        runner.prefilter()
        runner.step0()
        runner.runs([arm for arm in todo if arm != MORE_SAMPLES])
        if MORE_SAMPLES in todo:
            if runner.k_inputs_missing():
                raise SystemExit(f"{MORE_SAMPLES}: K' needs every `tapo` and `grpo` run of the protocol finished; "
                                 f"missing: {', '.join(runner.k_inputs_missing())}")
            k = runner.more_samples_k()["K"]
            runner.runs([MORE_SAMPLES], extra=(f"rollout.samples_per_question={k}",))
    stats = report()
    print((a.results / "miniature.md").read_text().split("## Results", 1)[1])
    if stats["pairs"].get("tapo - grpo"):
        print(f"TAPO - GRPO: {fmt_ci(stats['pairs']['tapo - grpo'], signed=True)}")

if __name__ == "__main__":
    main()
