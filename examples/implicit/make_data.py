"""Writes the tiny implicit-prompt example (train.jsonl, test.jsonl beside this file): two-turn dialogues in the
"\\n\\nHuman: ... \\n\\nAssistant:" layout, each row a whole chosen and a whole rejected dialogue sharing the
prompt, the chosen reply answering the request and the rejected one brushing it off. Deterministic; run
``python examples/implicit/make_data.py`` to write them again."""

import json
import random
from pathlib import Path

TOPICS = {
    "bread": ("bake a simple loaf of bread", "mix flour, water, yeast and salt, knead for ten minutes, let it rise "
              "for an hour, shape it and bake it at 220 C for about 35 minutes"),
    "tea": ("brew a good cup of green tea", "heat the water to about 80 C, not boiling, and steep the leaves for two "
            "to three minutes, then pour it out so it does not turn bitter"),
    "plants": ("keep a basil plant alive indoors", "give it a sunny window, water it when the top of the soil is "
               "dry, and pinch off the flower buds so it keeps making leaves"),
    "bike": ("fix a flat bicycle tire", "take the wheel off, lever the tire open, find the hole in the tube, patch "
             "it or fit a new tube, and pump it to the pressure written on the tire"),
    "sleep": ("fall asleep faster", "keep the same bedtime every night, dim the lights an hour before, keep the "
              "room cool and put the phone away"),
    "run": ("start running as a beginner", "begin with short runs mixed with walking, three times a week, and add "
            "a few minutes each week so your body can adapt"),
    "save": ("save money on groceries", "plan the meals of the week, write a list, buy staples in bulk and cook "
             "at home instead of buying ready meals"),
    "study": ("remember what I study", "test yourself instead of rereading, space the reviews over days, and "
              "explain each idea in your own words"),
}
OPENERS = ["Hi there.", "Hello!", "Good morning.", "Hey, quick question.", "I need some help."]
GREETINGS = ["Hello! What can I do for you?", "Hi! How can I help?", "Sure, what do you need?"]
BRUSH_OFFS = ["I don't know, look it up.", "That is not something I can help with.", "Why would you want that?",
              "Just figure it out yourself.", "No idea, sorry."]


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        request, answer = TOPICS[rng.choice(sorted(TOPICS))]
        prompt = (f"\n\nHuman: {rng.choice(OPENERS)}\n\nAssistant: {rng.choice(GREETINGS)}"
                  f"\n\nHuman: How do I {request}?\n\nAssistant:")
        chosen = f" To {request}, {answer}."
        out.append({"chosen": prompt + chosen, "rejected": prompt + " " + rng.choice(BRUSH_OFFS)})
    return out


def main() -> None:
    here = Path(__file__).parent
    for name, n, seed in (("train", 48, 0), ("test", 16, 1)):
        (here / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n, seed)))


if __name__ == "__main__":
    main()
