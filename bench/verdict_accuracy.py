"""Can a cold-start model tell the first wrong step? Teacher-forced verdicts on construction rows.

    .venv/bin/python bench/verdict_accuracy.py --model checkpoints/miniature-coldstart
    .venv/bin/python bench/verdict_accuracy.py --model runs/<run>/checkpoints/step_00000400 --aligned

Writes held-out construction (IFT) rows with the ``checked`` analysis ("Step 1 ok. Step 2 ok. Step 3 is
wrong: ...", rule-injected mistakes, seed 7; the shipped mix is seed 0, and 2 of the first 100 problems
are also in it), feeds each row's prompt and reference response to the model in one forward pass and reads,
at every verdict ("Step k" followed by " ok." or " is wrong: "), which of the two the model puts more
probability on. It isolates the one decision that places the reflection from everything the model does
afterwards (copying, finishing): a model whose verdicts score what always answering "ok" scores cannot
place its reflection by comparing the two answers.

Printed: the share of verdicts right, the share of rows with every verdict right, the mean probability the
model gives " is wrong: " (against " ") at the wrong step, and the share of "ok" verdicts in the rows (what
always answering "ok" scores). ``--model`` is an HF folder or a DeepSpeed checkpoint folder of an SFT run
(``step_*``: its ``mp_rank_00_model_states.pt`` is read into the architecture of ``--config-from``).
``--aligned`` renders the prompts with y⁻ and y⁺ side by side, line i of each on one line ("Step 2: 10+7=17 |
Step 2: 10-7=3"), for models trained on prompts laid out that way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tapo_ds.data import encode, render_chat  # noqa: E402


def side_by_side(prompt: str) -> str:
    head, rest = prompt.split("\nWrong:\n", 1)
    wrong, right = (block.splitlines() for block in rest.split("\nRight:\n", 1))
    n = max(len(wrong), len(right))
    wrong, right = wrong + ["-"] * (n - len(wrong)), right + ["-"] * (n - len(right))
    return head + "\nWrong | Right:\n" + "\n".join(f"{a} | {b}" for a, b in zip(wrong, right))


def load_model(path: Path, config_from: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    states = path / "mp_rank_00_model_states.pt"
    if not states.is_file():
        return AutoModelForCausalLM.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_from))
    model.load_state_dict(torch.load(states, map_location="cpu", weights_only=False)["module"])
    return model


def held_out_rows(n: int, seed: int) -> list[dict]:
    from tapo_ds.synthetic.mix import build_synthetic_mix

    mix = build_synthetic_mix(n, seed=seed, proportions={"ift": 1}, analysis="checked", steps=(3, 6), max_value=300)
    return mix.rows


def verdicts(model, tokenizer, rows: list[dict], aligned: bool) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    step, ok, wrong = ids("Step "), ids(" "), ids(" is wrong: ")
    digits = set(ids(list("0123456789")))
    right = total = rows_right = 0
    p_wrong, ok_share = [], []
    for row in rows:
        prompt = side_by_side(row["prompt"]) if aligned else row["prompt"]
        p = encode(tokenizer, render_chat(tokenizer, prompt, {}))
        a = encode(tokenizer, row["response"])
        with torch.no_grad():
            logp = model(torch.tensor([p + a])).logits[0].log_softmax(-1)
        end = a.index(ids("</analysis>"))
        all_right, labels = True, []
        for j in range(end - 2):
            if a[j] != step or a[j + 1] not in digits or a[j + 2] not in (ok, wrong):
                continue
            if a[j + 2] == ok and a[j + 3] != ids("o"):
                continue  # " is missing": a verdict on a step the text never wrote
            lp = logp[len(p) + j + 1]
            said_wrong = bool(lp[wrong] > lp[ok])
            good = said_wrong == (a[j + 2] == wrong)
            right, total, all_right = right + good, total + 1, all_right and good
            labels.append(a[j + 2] == ok)
            if a[j + 2] == wrong:
                p_wrong.append(float(lp[wrong].exp() / (lp[wrong].exp() + lp[ok].exp())))
        rows_right += all_right
        ok_share += labels
    return {"rows": len(rows), "verdicts": total, "verdicts_right": right / total, "rows_all_right": rows_right / len(rows),
            "p_wrong_at_wrong_step": statistics.mean(p_wrong), "always_ok_scores": sum(ok_share) / len(ok_share)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--config-from", type=Path, default=ROOT / "checkpoints" / "miniature-coldstart",
                    help="HF folder with the architecture (config.json) and tokenizer of a DeepSpeed checkpoint")
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--aligned", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    tokenizer = AutoTokenizer.from_pretrained(a.model if (a.model / "tokenizer.json").is_file() else a.config_from)
    model = load_model(a.model, a.config_from).eval()
    res = verdicts(model, tokenizer, held_out_rows(a.rows, a.seed), a.aligned)
    print(json.dumps({"model": str(a.model), "aligned": a.aligned, **res}, indent=1))


if __name__ == "__main__":
    main()
