"""Compose ``tiny_corpus.txt``: plain English prose written from a small grammar, seeded, offline.

The shipped text is the output of this script (``python examples/data/compose_text.py``); it is kept
here so the corpus can be regenerated or grown. Everything is original: no text is downloaded.
"""

from __future__ import annotations

import random
from pathlib import Path

PLACES = ["the village", "the harbour", "the old mill", "the valley", "the market square", "the north road",
          "the river bank", "the orchard", "the lighthouse", "the school house", "the bakery", "the forest edge",
          "the station", "the library", "the hill farm", "the bridge", "the chapel", "the meadow"]
PEOPLE = ["the miller", "the baker", "the old fisherman", "the schoolmistress", "the young shepherd",
          "the blacksmith", "the widow Ames", "the doctor", "the carpenter", "the ferryman", "the weaver",
          "the stationmaster", "Thomas", "Margaret", "little Anne", "the farmer's son", "the clerk",
          "the keeper of the light", "Old Samuel", "Eliza", "the travelling tinker", "the innkeeper"]
THINGS = ["a lantern", "a basket of apples", "a letter", "an old map", "a loaf of bread", "a silver coin",
          "a wooden box", "a bundle of wool", "a pair of boots", "a small knife", "a book of songs",
          "a jar of honey", "a length of rope", "a blue ribbon", "a brass key", "a fishing net", "a clock",
          "a sack of flour", "a candle", "a bell"]
TIMES = ["In the morning", "At noon", "Late in the evening", "Before dawn", "On the first day of spring",
         "When the rain stopped", "After the harvest", "In the middle of winter", "On market day",
         "When the tide came in", "Long after supper", "At the turn of the year", "Early one Sunday",
         "As the sun went down", "During the long summer", "When the snow began"]
WEATHER = ["the wind came hard from the sea", "a thin rain fell over the roofs", "the sky was clear and cold",
           "fog lay low over the fields", "the air was warm and still", "clouds gathered over the hills",
           "frost whitened the grass", "the sun stood high and bright", "a storm rolled in from the west",
           "snow drifted against the doors"]
VERBS_PAST = ["walked to", "hurried toward", "looked out over", "came back from", "waited near", "sang at",
              "worked beside", "slept near", "returned to", "wandered through", "climbed up to", "rested at"]
ACTIONS = ["mended the fence", "counted the sheep", "baked bread for the week", "wrote a long letter",
           "swept the floor", "lit the lamps", "carried water from the well", "sharpened the tools",
           "read aloud by the fire", "repaired the boat", "planted beans in rows", "fed the horses",
           "told an old story", "sold eggs at the market", "painted the door green", "mended a torn sail",
           "gathered firewood", "tuned the fiddle", "set the table for guests", "wound the great clock"]
FEELINGS = ["glad", "tired", "uneasy", "hopeful", "quiet", "restless", "content", "curious", "worried",
            "proud", "lonely", "cheerful", "patient", "surprised"]
ADJ = ["small", "old", "narrow", "bright", "dark", "warm", "cold", "quiet", "busy", "green", "grey", "long",
       "crooked", "pleasant", "empty", "crowded"]
NOUNS = ["road", "house", "garden", "window", "wall", "field", "path", "gate", "room", "yard", "hill", "shop"]
MAXIMS = ["A patient hand mends more than a hasty one.", "Bread shared is bread doubled.",
          "The river does not hurry, yet it reaches the sea.", "Every lamp was once a single spark.",
          "What is planted in spring is eaten in winter.", "A kind word costs nothing and buys much.",
          "The longest road begins at the garden gate.", "Still water shows the clearest sky.",
          "Many hands make light of a heavy load.", "A clock that is wound keeps good time."]
SAID = ["said", "replied", "whispered", "called out", "answered", "muttered", "laughed"]
QUOTES = ["We shall need more wood before the frost", "Has anyone seen the ferry today",
          "The bread is ready, come and eat", "I think the weather will turn by morning",
          "There is a light on the water", "Bring the lantern and follow me",
          "It was my grandfather who built this wall", "Do you hear the bell from the chapel",
          "The road is long, but we know the way", "Mind the step, it is broken",
          "Tomorrow we go to market", "Tell me the story of the lighthouse again",
          "The sheep have found the gap in the fence", "Let us wait until the rain has passed"]


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


def sentence(r: random.Random) -> str:
    kind = r.randrange(9)
    p, q = r.sample(PEOPLE, 2)
    if kind == 0:
        return f"{r.choice(TIMES)}, {r.choice(WEATHER)}, and {p} {r.choice(VERBS_PAST)} {r.choice(PLACES)}."
    if kind == 1:
        return f"{cap(p)} {r.choice(ACTIONS)} while {q} {r.choice(ACTIONS)}."
    if kind == 2:
        return f'"{r.choice(QUOTES)}," {p} {r.choice(SAID)}.'
    if kind == 3:
        return (f"{cap(p)} carried {r.choice(THINGS)} along the {r.choice(ADJ)} {r.choice(NOUNS)} "
                f"and felt {r.choice(FEELINGS)}.")
    if kind == 4:
        return f"There was {r.choice(THINGS)} on the table, and beside it {r.choice(THINGS)}."
    if kind == 5:
        return (f"{cap(q)} gave {p} {r.choice(THINGS)}, for {r.choice(WEATHER)} and the "
                f"{r.choice(NOUNS)} was {r.choice(ADJ)}.")
    if kind == 6:
        return r.choice(MAXIMS)
    if kind == 7:
        n = r.randint(2, 12)
        return f"It was {n} miles from {r.choice(PLACES)} to {r.choice(PLACES)}, and {p} knew every step."
    return (f"Nobody in {r.choice(PLACES)} could remember a time when {p} had not "
            f"been seen at {r.choice(PLACES)}.")


def chapter(r: random.Random, number: int) -> str:
    title = f"{cap(r.choice(ADJ))} {cap(r.choice(NOUNS))}"
    paras = []
    for _ in range(r.randint(5, 9)):
        paras.append(" ".join(sentence(r) for _ in range(r.randint(3, 7))))
    return f"CHAPTER {number}. The {title}\n\n" + "\n\n".join(paras) + "\n"


def compose(target_bytes: int = 200_000, seed: int = 1887) -> str:
    r = random.Random(seed)
    parts = ["TALES OF THE VALLEY\n\nA small book of plain stories, composed for testing language models.\n"]
    n = 1
    while sum(len(p) for p in parts) < target_bytes:
        parts.append(chapter(r, n))
        n += 1
    return "\n".join(parts)


if __name__ == "__main__":
    out = Path(__file__).with_name("tiny_corpus.txt")
    out.write_text(compose(), encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size} bytes)")
