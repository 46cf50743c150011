"""The default task's prompts: requests for a short review of something, neutral about the sentiment."""

from __future__ import annotations

import random

TEMPLATES = (
    "Write a short review of {}.",
    "Write a two-sentence review of {}.",
    "Review {} in a few lines.",
    "What do you think of {}? Answer briefly.",
    "Give a brief opinion of {}.",
    "Describe your experience with {} in a short review.",
    "Write a short customer review of {}.",
    "In one or two lines, tell me how you found {}.",
)

SUBJECTS = (
    # Films and shows.
    "a science fiction movie about time travel", "a movie set in Paris",
    "a film set in a lighthouse", "an animated movie about a robot",
    "a documentary about deep-sea creatures",
    "a superhero movie sequel", "a courtroom drama", "a western about a cattle drive", "a musical about a jazz band",
    "a historical film set in the desert", "a detective series set in a small town", "a cooking show",
    # Books.
    "a mystery book set on a train", "a cookbook of vegetarian recipes", "a biography of a famous inventor",
    "a fantasy book about dragons", "a self-help book about productivity", "a children's book about a mouse",
    "a history book about ancient Rome", "a poetry collection about the sea", "a spy book set in Berlin",
    # Places to eat.
    "a small Italian restaurant downtown", "a sushi bar near the train station", "a family-run Mexican taqueria",
    "a vegan cafe", "a steakhouse", "a food truck selling tacos", "a French bakery", "a late-night pizza place",
    "an Indian buffet", "a coffee shop with outdoor seating", "a ramen shop", "a seafood restaurant by the harbor",
    # Products.
    "a pair of running shoes", "a set of wireless headphones", "a budget smartphone", "a robot vacuum",
    "an electric toothbrush", "a camping tent", "a mechanical keyboard", "a kitchen blender", "a smartwatch",
    "a hiking backpack", "an office chair", "a coffee maker", "a winter jacket", "a laptop for students",
    "an electric scooter", "a cast-iron pan",
    # Travel.
    "a beach resort", "a hostel in the city center", "a cruise to Alaska", "a budget airline flight", "a ski lodge",
    "a bed and breakfast in the countryside", "a guided city bus tour", "a campsite by a lake",
    # Games, music, services and outings.
    "a puzzle video game", "an online multiplayer game", "a board game for families", "a rock album",
    "a classical music concert", "a magic show", "a yoga class", "a dentist's office", "a car rental service",
    "a museum of modern art", "a zoo", "a theme park", "a gym", "a hair salon", "a mobile banking app",
    "a language learning app", "a music streaming service", "a local library", "a moving company",
    "a plumbing repair service",
)


def review_prompts(n: int | None = None, *, seed: int = 0) -> list[str]:
    """``n`` distinct prompts (all of them when None), in an order fixed by ``seed``."""
    prompts = [t.format(s) for s in SUBJECTS for t in TEMPLATES]
    if n is None:
        n = len(prompts)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(prompts):
        raise ValueError(f"n must be an int in [0, {len(prompts)}], got {n!r}")
    return random.Random(seed).sample(prompts, n)
