"""Tiny preference files for the trainer and pipeline tests: sentiment words decide chosen vs rejected."""

import json
import random

POSITIVE = ["good", "great", "wonderful", "lovely", "excellent", "happy"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "dull", "sad"]
FILLER = "the movie was a story with some plot and it had long scenes".split()


def write_pairs(path, n, seed=0):
    """``n`` rows {"prompt", "chosen", "rejected"} as JSON Lines; returns the path as a string."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            body = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
            tail = [rng.choice(FILLER) for _ in range(rng.randint(0, 3))]
            row = {"prompt": f"Write a short review of movie {i % 7}.",
                   "chosen": " ".join(body + [rng.choice(POSITIVE)] + tail),
                   "rejected": " ".join(body + [rng.choice(NEGATIVE)] + tail)}
            f.write(json.dumps(row) + "\n")
    return str(path)


def write_implicit_pairs(path, n, seed=0):
    """``n`` rows {"chosen", "rejected"} in TRL's implicit-prompt format: two dialogues with the same
    "\\n\\nHuman: ... \\n\\nAssistant:" turns, differing in the last assistant reply; returns the path."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            prompt = (f"\n\nHuman: I saw movie {i % 7} last night.\n\nAssistant: What was it like?"
                      f"\n\nHuman: Write me a short review of it.\n\nAssistant:")
            body = " ".join(rng.choice(FILLER) for _ in range(rng.randint(2, 6)))
            f.write(json.dumps({"chosen": f"{prompt} {body} {rng.choice(POSITIVE)}",
                                "rejected": f"{prompt} {body} {rng.choice(NEGATIVE)}"}) + "\n")
    return str(path)
