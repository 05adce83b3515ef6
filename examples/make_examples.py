"""Generates the example datasets (no downloads) and, with --train, retrains the example adapters.

  python examples/make_examples.py            # writes examples/data/*/{train,test}.jsonl
  python examples/make_examples.py --train    # ...then trains adapters/examples/<name>/

Two tasks the default base (SmolLM2-135M-Instruct) fails and a small LoRA learns on CPU:
  date-iso        generation: a date written in words -> ISO 8601 (YYYY-MM-DD)
  ticket-routing  classification: a customer message -> billing | technical | shipping | account
and one on the vision base (mobilenet-v2, ImageNet), whose new head starts at chance:
  digits          image classification: a handwritten digit (sklearn's bundled 8x8 scans) -> 0..9,
                  written as an image-folder tree (examples/data/digits/{train,test}/<digit>/*.png)
Everything is seeded, so the files (and their sha256 in each manifest) are reproducible.
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import random
import shutil
import sys
from datetime import date, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO / "examples" / "data"
CONFIG_DIR = REPO / "examples" / "configs"
ADAPTER_DIR = REPO / "adapters" / "examples"
EXAMPLES = ("date-iso", "ticket-routing", "digits")

# ---------- date-iso ----------

_DATE_PROMPTS = (
    "Convert this date to ISO format: {}",
    "Write {} as an ISO date.",
    "ISO date for: {}",
    "Normalize the date \"{}\".",
)


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _spell_date(day: date, rng: random.Random) -> str:
    month, short = calendar.month_name[day.month], calendar.month_abbr[day.month]
    styles = (
        f"{month} {day.day}, {day.year}",
        f"{day.day} {month} {day.year}",
        f"{short} {day.day}, {day.year}",
        f"the {_ordinal(day.day)} of {month} {day.year}",
        f"{month} {_ordinal(day.day)}, {day.year}",
        f"{calendar.day_name[day.weekday()]}, {month} {day.day}, {day.year}",
    )
    return rng.choice(styles)


def date_rows(count: int, rng: random.Random, exclude: set[str]) -> list[dict[str, str]]:
    rows, first = [], date(1950, 1, 1)
    while len(rows) < count:
        day = first + timedelta(days=rng.randrange(365 * 100))
        iso = day.isoformat()
        if iso in exclude:
            continue
        exclude.add(iso)
        rows.append({"input": rng.choice(_DATE_PROMPTS).format(_spell_date(day, rng)), "target": iso})
    return rows


# ---------- ticket-routing ----------

_TICKET_TOPICS = {
    "billing": (
        "I was charged twice for my {plan} subscription", "my invoice for {month} shows the wrong amount",
        "please refund the payment I made on {month} 3rd", "why did my card get billed {amount} this week",
        "the {plan} plan price went up without notice", "I need a receipt for my last payment of {amount}",
        "cancel the automatic renewal charge on my card", "there is an unknown charge of {amount} on my statement",
    ),
    "technical": (
        "the app crashes every time I open {feature}", "I get error {code} when I try to sync",
        "{feature} has been loading forever since the update", "the website shows a blank page in {browser}",
        "notifications stopped working on my phone", "uploading a file fails with error {code}",
        "{feature} is very slow and freezes", "the export button does nothing in {browser}",
    ),
    "shipping": (
        "my package has not arrived after {days} days", "the tracking number for order {order} does not work",
        "the parcel was delivered to the wrong address", "can you ship order {order} to a different city",
        "the box arrived damaged and the item is broken", "when will order {order} be dispatched",
        "the courier says the delivery failed twice", "I want express delivery for order {order}",
    ),
    "account": (
        "I cannot log in even after resetting my password", "please change the email address on my profile",
        "how do I delete my account permanently", "I want to add a second user to my team",
        "my account was locked after {days} failed attempts", "please update my username",
        "I did not receive the verification email", "how can I turn on two-factor authentication",
    ),
}
_FILLERS = {
    "plan": ("Basic", "Pro", "Family", "Business"),
    "month": ("January", "March", "May", "August", "October", "December"),
    "amount": ("$9.99", "$45", "$120", "EUR 30", "$7.50"),
    "feature": ("the dashboard", "the calendar", "the photo editor", "search", "the settings page"),
    "code": ("500", "E42", "0x80070005", "403", "timeout"),
    "browser": ("Chrome", "Firefox", "Safari", "Edge"),
    "days": ("5", "10", "three", "twelve"),
    "order": ("#48213", "#10022", "A-7781", "#99310"),
}
_OPENERS = ("", "Hi, ", "Hello team, ", "Urgent: ", "Good morning. ", "Hey, ")
_CLOSERS = ("", " Thanks.", " Please help.", " What should I do?", " This is frustrating.", " Regards, Sam")


def ticket_rows(count: int, rng: random.Random, exclude: set[str]) -> list[dict[str, str]]:
    rows, labels = [], sorted(_TICKET_TOPICS)
    while len(rows) < count:
        label = labels[len(rows) % len(labels)]  # balanced: chance accuracy is 1/4
        template = rng.choice(_TICKET_TOPICS[label])
        body = template.format(**{k: rng.choice(v) for k, v in _FILLERS.items()})
        text = f"{rng.choice(_OPENERS)}{body}.{rng.choice(_CLOSERS)}"
        if text in exclude:
            continue
        exclude.add(text)
        rows.append({"text": text, "label": label})
    rng.shuffle(rows)
    return rows


# ---------- digits (images) ----------

def write_digit_images(root: Path, test_fraction: float = 0.2) -> tuple[int, int]:
    """sklearn's 1,797 bundled 8x8 digit scans as PNGs in a train/test image-folder tree (stratified)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = random.Random("adaptserve-digits")
    shutil.rmtree(root, ignore_errors=True)
    counts = {"train": 0, "test": 0}
    for digit in range(10):
        indices = [i for i, target in enumerate(digits.target) if target == digit]
        rng.shuffle(indices)
        cut = round(len(indices) * test_fraction)
        for split, chosen in (("test", indices[:cut]), ("train", indices[cut:])):
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for index in chosen:
                # 0..16 ink levels -> 8-bit grey, ink dark on white like a scan
                pixels = (255 - digits.images[index] * 255 / 16).round().astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index:04d}.png")
            counts[split] += len(chosen)
    return counts["train"], counts["test"]


# ---------- files and training ----------

def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def make_datasets(data_dir: Path = DATA_DIR) -> None:
    for name, make, train_count, test_count in (("date-iso", date_rows, 600, 100), ("ticket-routing", ticket_rows, 400, 120)):
        rng, seen = random.Random(f"adaptserve-{name}"), set()
        write_jsonl(data_dir / name / "train.jsonl", make(train_count, rng, seen))
        # `seen` is shared, so no test row repeats a training row.
        write_jsonl(data_dir / name / "test.jsonl", make(test_count, rng, seen))
        print(f"wrote {data_dir / name} ({train_count} train, {test_count} test)")
    train_count, test_count = write_digit_images(data_dir / "digits")
    print(f"wrote {data_dir / 'digits'} ({train_count} train, {test_count} test images)")


def train_examples(names: list[str]) -> None:
    # Importable from a plain checkout too, not only after `pip install -e .`.
    sys.path.insert(0, str(REPO))
    from trainer.cli import main as trainer_main

    # The configs name their files relative to the repository root, and the config written
    # next to each shipped adapter should not carry this machine's absolute paths.
    os.chdir(REPO)
    for name in names:
        output = ADAPTER_DIR / name
        relative_output = output.relative_to(REPO)
        code = trainer_main(["train", "--config", str(CONFIG_DIR.relative_to(REPO) / f"{name}.yaml"), "--output-dir", str(relative_output)])
        if code:
            sys.exit(code)
        # Checkpoints exist for --resume; the shipped example is the adapter and its reports only.
        shutil.rmtree(output / "checkpoints", ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", action="store_true", help="also retrain the example adapters")
    parser.add_argument("--only", choices=EXAMPLES, action="append", help="restrict --train to these examples")
    args = parser.parse_args()
    make_datasets()
    if args.train:
        train_examples(args.only or list(EXAMPLES))


if __name__ == "__main__":
    main()
