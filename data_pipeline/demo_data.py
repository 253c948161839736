"""The project's own demo data: LIMA-style prompt/response pairs written for this project.

No third-party text: every prompt and response below was written for lima-jax (some assembled from
templates plus hand-written facts). Forty training conversations over the six LIMA sources (four of
them multi-turn), five dev prompts and five test prompts, plus a small sentencepiece model trained on
that text, so `make demo` never needs the LLaMA tokenizer.

Demo tokenizer: DEMO_VOCAB_SIZE = 500 sentencepiece pieces (BPE, byte fallback, unk=0, bos=1, eos=2,
no pad), so EOT = 500 and the vocabulary with EOT has 501 ids, within the tiny preset's 512.
"""
from __future__ import annotations

import io
import json
import os

from lima_jax.atomic import atomic_write_bytes, atomic_write_text

DEMO_VOCAB_SIZE = 500

STACKEXCHANGE = [
    ("Why does my Python list change when I modify a copy of it?\nI wrote `b = a` and then `b.append(4)`, and now "
     "`a` also has 4 in it. I expected `a` to stay the same.",
     "Assigning a list to a new name does not copy it. After `b = a`, both names refer to the same list object, so "
     "a change made through one name is visible through the other.\n\nTo get an independent list, make a copy:\n\n"
     "```python\na = [1, 2, 3]\nb = a.copy()  # or list(a), or a[:]\nb.append(4)\nprint(a)  # [1, 2, 3]\n```\n\n"
     "This is a shallow copy: if the list holds other mutable objects, such as inner lists, those are still "
     "shared. For nested structures use `copy.deepcopy(a)`.\n\nYou can check whether two names point to the "
     "same object with `a is b`."),
    ("What is the difference between a process and a thread?",
     "A process is a running program with its own address space: its own memory, open files and resources. "
     "Two processes cannot read each other's memory unless they set up shared memory or talk through pipes, "
     "sockets or files.\n\nA thread is a path of execution inside a process. All threads of a process share "
     "the same memory, so they can work on the same data directly, which is fast but means they must "
     "coordinate with locks or other synchronisation to avoid race conditions.\n\nIn short:\n\n"
     "- Creating a process is more expensive than creating a thread.\n- A crash in one process does not take "
     "down another; a crash in one thread usually ends the whole process.\n- Threads communicate through "
     "shared memory; processes communicate through the operating system."),
    ("Why is the sky blue but sunsets are red?",
     "Sunlight contains all visible colours. When it passes through the atmosphere, it is scattered by gas "
     "molecules that are much smaller than its wavelength. This Rayleigh scattering is much stronger for short "
     "wavelengths: blue light is scattered roughly five times more than red light.\n\nDuring the day, blue "
     "light is scattered across the whole sky and reaches your eyes from every direction, so the sky looks "
     "blue.\n\nAt sunset the light travels through far more air before it reaches you. Most of the blue is "
     "scattered out of the direct beam along the way, and what is left is dominated by orange and red. Dust "
     "and smoke in the air can make the colours even stronger."),
    ("How do I undo the last commit in git without losing my changes?",
     "Use a soft or mixed reset to move the branch back by one commit while keeping your work:\n\n"
     "```bash\ngit reset --soft HEAD~1\n```\n\nWith `--soft` the changes from the undone commit stay staged, "
     "ready to be committed again. With the default `--mixed` they stay in your working tree but are "
     "unstaged:\n\n```bash\ngit reset HEAD~1\n```\n\nAvoid `--hard` here: it throws the changes away.\n\nIf the "
     "commit was already pushed and others may have pulled it, prefer `git revert HEAD`, which adds a new "
     "commit that undoes the old one instead of rewriting history."),
    ("Is it safe to store passwords in a database if I hash them with SHA-256?",
     "Not really. SHA-256 is designed to be fast, and that is exactly what you do not want for passwords. An "
     "attacker who steals the table can try billions of guesses per second on a graphics card.\n\nUse a "
     "password hashing function that is deliberately slow and salted:\n\n- Argon2id (the current "
     "recommendation)\n- scrypt\n- bcrypt\n\nThese add a random salt per password, so identical passwords get "
     "different hashes, and they let you tune the cost as hardware gets faster. Most languages have a "
     "well-tested library for them; do not write your own. Store only the resulting hash string, which "
     "already contains the salt and the parameters."),
    ("Why do we use a learning rate schedule instead of a constant learning rate?",
     "Early in training the parameters are far from a good solution, so large steps make fast progress. Later "
     "the model is close to a minimum, and large steps make the loss bounce around instead of settling.\n\nA "
     "schedule gets both benefits: it starts with a larger learning rate and lowers it over time. Common "
     "choices are:\n\n1. Linear decay from a peak value to a small final value.\n2. Cosine decay, which "
     "lowers the rate slowly at first and then faster.\n3. Step decay, which divides the rate by a constant "
     "at fixed epochs.\n\nMany recipes also add a short warmup at the start, which avoids unstable updates "
     "while optimizer statistics such as Adam's moment estimates are still poor."),
    ("What does the `static` keyword mean on a method in Java?",
     "A `static` method belongs to the class itself rather than to any instance. You call it on the class "
     "name and it has no `this`:\n\n```java\nclass MathUtil {\n    static int square(int x) {\n        return "
     "x * x;\n    }\n}\n\nint y = MathUtil.square(5);\n```\n\nBecause there is no instance, a static method "
     "cannot read instance fields or call instance methods directly. It can use static fields and other "
     "static methods.\n\nStatic methods are a good fit for helpers that only depend on their arguments, and "
     "for factory methods such as `Integer.valueOf`."),
    ("Why does ice float on water?",
     "Most substances are denser as solids than as liquids, but water is an exception. When water freezes, "
     "each molecule forms hydrogen bonds with four neighbours, locking the molecules into an open hexagonal "
     "lattice. That lattice holds the molecules farther apart on average than in liquid water, where bonds "
     "constantly break and re-form and molecules can pack more closely.\n\nAs a result ice is about nine "
     "percent less dense than liquid water, and anything less dense than the liquid around it floats.\n\n"
     "This matters for life: lakes freeze from the top down, and the ice layer insulates the water below, so "
     "fish survive the winter."),
]

AUTHORS = [
    ("Can you suggest a simple weekly meal plan for someone who is new to cooking?",
     "Here is a plan built around a few easy recipes that share ingredients, so little goes to waste.\n\n"
     "- Monday: pasta with tomato sauce and a green salad.\n- Tuesday: vegetable omelette with toast.\n"
     "- Wednesday: rice bowl with beans, roasted vegetables and a fried egg.\n- Thursday: leftover pasta "
     "sauce turned into a simple vegetable soup.\n- Friday: baked chicken thighs with potatoes and carrots.\n"
     "- Saturday: homemade pizza on store-bought dough.\n- Sunday: leftover chicken in wraps with salad.\n\n"
     "Shop once for the week, cook extra rice and vegetables on Wednesday, and keep eggs, pasta and canned "
     "tomatoes in the cupboard as a backup. After two weeks you will know these recipes well enough to "
     "start changing them."),
    ("Write a short thank-you note to a colleague who helped me finish a project.",
     "Hi Sam,\n\nThank you for all your help on the report this week. Your work on the data section saved "
     "me hours, and your comments on the draft made the whole thing clearer. I could not have finished it on "
     "time without you.\n\nIf you ever need a hand with one of your projects, just let me know.\n\n"
     "Thanks again,\nAlex"),
    ("How can I get better at remembering what I read?",
     "Memory improves most when you work with the material instead of just reading it again. A few habits "
     "help a lot:\n\n1. Before you start, skim the headings and ask what you want to learn.\n2. After each "
     "section, close the book and write two or three sentences from memory.\n3. Explain the main idea out "
     "loud, as if to a friend. Gaps in your understanding show up quickly.\n4. Review the notes after a day, "
     "then after a week. Spaced review is far more effective than one long session.\n5. Connect new ideas to "
     "things you already know, or to a concrete example.\n\nIt feels slower at first, but you will keep much "
     "more of each book."),
    ("What should I consider before adopting a dog?",
     "A dog is a commitment of ten to fifteen years, so it is worth thinking through a few questions first.\n\n"
     "- Time: dogs need walks, play and company every day. Long working hours mean you may need a dog walker.\n"
     "- Space: a large, energetic breed is hard to keep happy in a small flat.\n- Money: food, vet visits, "
     "vaccinations, insurance and boarding add up to a real monthly cost.\n- Training: every dog needs "
     "patient, consistent training, especially in the first year.\n- Household: check for allergies and make "
     "sure everyone at home agrees.\n\nIf the answers fit, consider a shelter dog. Staff can often tell you "
     "about each dog's temperament, which helps you find a good match."),
    ("Explain what inflation is to a twelve-year-old.",
     "Inflation means that prices, on average, go up over time. If a sandwich costs five dollars this year "
     "and five dollars and twenty cents next year, that is inflation.\n\nIt happens for a few reasons. "
     "Sometimes people want to buy more things than shops can supply, so sellers raise prices. Sometimes it "
     "costs more to make things, for example when fuel becomes expensive.\n\nInflation matters because the "
     "same amount of money buys a bit less each year. That is why grown-ups talk about saving in ways that "
     "grow, like a savings account with interest, instead of keeping cash in a drawer."),
    ("Give me some tips for a job interview over video call.",
     "Video interviews reward a little preparation.\n\n1. Test your camera, microphone and internet an hour "
     "before, using the same app the interviewer will use.\n2. Sit facing a window or a lamp so your face is "
     "well lit, with a tidy, quiet background.\n3. Put the camera at eye level and look at it when you speak; "
     "it feels like eye contact to the other person.\n4. Keep a glass of water and a short list of your key "
     "points nearby, but do not read from it.\n5. Close other programs and silence notifications.\n6. Have "
     "your phone ready in case the connection drops, and say so calmly if it does.\n\nFinally, dress as you "
     "would for an in-person interview. It helps you feel the part."),
    ("Write a haiku about autumn rain.",
     "Cold rain on the roof,\nred leaves sliding down the glass,\nthe kettle begins."),
    ("What is a good way to start learning to program?",
     "Pick one beginner-friendly language, such as Python, and one small goal you care about, such as a "
     "program that tracks your expenses or renames your photos.\n\nThen work in short loops:\n\n1. Learn a "
     "basic concept: variables, conditions, loops, functions, lists.\n2. Write a tiny program that uses it.\n"
     "3. Break it on purpose and read the error message.\n\nA free interactive course can give you structure "
     "for the first few weeks. After that, building your own small projects teaches more than any course, "
     "because you meet real problems and learn to search for answers. Expect to feel stuck often; that is "
     "a normal part of learning, not a sign that programming is not for you."),
]

WIKIHOW = [
    ("Make a Cup of Tea", ["Boil fresh water in a kettle.",
                           "Warm the mug or teapot with a splash of hot water, then pour it out.",
                           "Put one tea bag or one teaspoon of loose tea per cup into the pot.",
                           "Pour the water over the tea and let it steep for three to five minutes.",
                           "Remove the tea, then add milk, lemon or honey to taste."]),
    ("Clean a Computer Keyboard", ["Turn off the computer or unplug the keyboard.",
                                   "Turn the keyboard upside down and shake out loose crumbs.",
                                   "Blow between the keys with a can of compressed air.",
                                   "Wipe the keys with a cloth lightly dampened with rubbing alcohol.",
                                   "Let it dry completely before plugging it back in."]),
    ("Plant a Tomato Seedling", ["Choose a sunny spot that gets at least six hours of light a day.",
                                 "Dig a hole deep enough to bury two thirds of the stem.",
                                 "Remove the lower leaves and set the seedling in the hole.",
                                 "Fill the hole with soil mixed with compost and press it down gently.",
                                 "Water deeply and add a stake or cage for support."]),
    ("Change a Bicycle Tire", ["Shift to the smallest gear and open the brake so the wheel comes out easily.",
                               "Remove the wheel and let out any remaining air.",
                               "Use tire levers to pry one side of the tire off the rim.",
                               "Pull out the old tube and check the inside of the tire for thorns.",
                               "Put in the new tube, slightly inflated, and push the tire back onto the rim.",
                               "Inflate to the pressure printed on the tire and refit the wheel."]),
    ("Write a Good Email Subject Line", ["Put the most important words first.",
                                         "Say what you need, such as a decision or a reply by a date.",
                                         "Keep it under about eight words.",
                                         "Avoid vague lines like \"Quick question\" or \"Update\".",
                                         "Update the subject when the topic of a thread changes."]),
    ("Fall Asleep Faster", ["Go to bed and get up at the same time every day.",
                            "Stop using bright screens about an hour before bed.",
                            "Keep the bedroom cool, dark and quiet.",
                            "Avoid coffee after early afternoon.",
                            "If you are awake after twenty minutes, get up and read until you feel sleepy."]),
    ("Make a Budget", ["Add up your monthly income after tax.",
                       "List fixed costs such as rent, insurance and loan payments.",
                       "Track your spending for a month to see the variable costs.",
                       "Set a savings amount first and treat it like a bill.",
                       "Give the rest of the money a category and review the budget each month."]),
    ("Remove a Splinter", ["Wash your hands and the skin around the splinter with soap and water.",
                           "Clean a pair of tweezers with rubbing alcohol.",
                           "Grip the end of the splinter and pull it out in the direction it went in.",
                           "Wash the area again and cover it with a bandage.",
                           "See a doctor if the splinter is deep, under a nail, or the area becomes red."]),
]

NLP = [
    ("Classify the sentiment of the review as positive or negative.",
     "The battery lasts two full days and the screen is bright even in sunlight.", "Positive"),
    ("Classify the sentiment of the review as positive or negative.",
     "The zipper broke after a week and the seller never answered my messages.", "Negative"),
    ("Rewrite the sentence in the passive voice.", "The committee approved the new budget on Friday.",
     "The new budget was approved by the committee on Friday."),
    ("Rewrite the sentence in the passive voice.", "Our neighbours planted three apple trees last spring.",
     "Three apple trees were planted by our neighbours last spring."),
    ("Summarize the paragraph in one sentence.",
     "The town library will close for renovation from June to August. During that time, a temporary branch "
     "will open in the community centre with a smaller collection, and all due dates will be extended.",
     "The library closes for renovation this summer, with a smaller temporary branch in the community centre "
     "and extended due dates."),
    ("Extract the names of all cities mentioned in the text.",
     "After a week in Lisbon, we took the train to Madrid and then flew home from Barcelona.",
     "Lisbon, Madrid, Barcelona"),
    ("Answer the question using the passage.",
     "Passage: Honeybees communicate the location of flowers with a waggle dance. The angle of the dance shows "
     "the direction relative to the sun, and its length shows the distance.\nQuestion: What does the length "
     "of the dance show?", "The distance to the flowers."),
    ("Correct the grammar of the sentence.", "She don't like going to the cinema alone.",
     "She doesn't like going to the cinema alone."),
]

WRITINGPROMPTS = [
    ("Write a short story about a lighthouse keeper who receives a letter from the sea.",
     "Every morning Ada walked the rocks below the lighthouse, looking for whatever the tide had left. Usually "
     "it was rope, or glass worn smooth as soap. On the morning after the storm it was a bottle, sealed with "
     "wax, and inside it a letter addressed to her.\n\n\"Thank you for the light,\" it said, in careful, "
     "old-fashioned handwriting. \"We saw it every night and knew where the rocks were. We are home now.\"\n\n"
     "There was no signature, only a date forty years old, the year her grandmother had kept the light.\n\n"
     "Ada read it twice, then climbed the stairs and polished the great lens until it shone. That night, for "
     "the first time in years, she did not feel that she was keeping the light for nobody."),
    ("Write a story in which a robot learns to bake bread.",
     "Unit Seven had been built to sort parcels, so the first loaf it baked was perfectly rectangular and "
     "almost perfectly inedible.\n\n\"Too much flour,\" said Mrs. Okafor, who ran the bakery and had bought "
     "the robot second-hand. \"And you cannot rush the dough. It needs time.\"\n\nTime was not a variable Unit "
     "Seven had been given. It watched her hands instead: how she folded, pressed and turned, how she waited. "
     "It learned that the dough was ready when it sprang back slowly, not when a timer said so.\n\nThe "
     "hundredth loaf was round and golden. Mrs. Okafor tore off the end, chewed, and nodded once. Unit Seven "
     "recorded the nod in the part of its memory it did not allow itself to erase."),
    ("Write a story that begins with: \"The map was wrong, and that was the point.\"",
     "The map was wrong, and that was the point. My grandfather had drawn the river on the wrong side of the "
     "valley and put the old mill where only birches grew.\n\n\"Anyone who finds the place with this map,\" he "
     "used to say, \"has to have been there before.\"\n\nSo when I finally went, I ignored the ink and followed "
     "what I remembered of his stories: the bend where he lost a boot, the rock shaped like a sleeping dog, "
     "the smell of wild mint by the water.\n\nThe mill was there, roofless and green with moss. On the lintel, "
     "cut deep into the stone, were his initials and mine, the way he had promised."),
    ("Write a story about the last day of summer camp, told by the camp's oldest tree.",
     "I have watched ninety summers end, and they always end the same way: with too many hugs and not "
     "enough time.\n\nThis year a girl named Priya sat under my branches every evening to write letters she "
     "never sent. Today she finally read one out loud to the boy from the canoe cabin. He laughed, then "
     "stopped laughing, then asked for her address.\n\nBuses came at noon. Parents carried sleeping bags and "
     "the smell of sunscreen drifted away down the road.\n\nBy evening the camp was quiet. A single letter was "
     "tucked between my roots, weighed down with a stone. I cannot read, but I will keep it until next June."),
]

MULTI_TURN = [
    ["I want to start running. How far should I run in my first week?",
     "Start with less than you think. In the first week, aim for three sessions of about twenty minutes, "
     "alternating one minute of easy running with two minutes of walking. The goal is to finish each session "
     "feeling that you could have done more. Rest or walk on the days in between.",
     "What if my knees hurt after the second session?",
     "Mild muscle soreness is normal, but pain in the knees is a signal to slow down. Take two or three days "
     "off, then try shorter sessions on soft, flat ground such as a track or a park path. Check your shoes: "
     "worn-out soles are a common cause. If the pain is sharp, causes swelling, or comes back every time, see "
     "a doctor or a physiotherapist before you continue."],
    ["Can you help me name my new bakery? It is small and focuses on sourdough.",
     "Here are a few ideas:\n\n- Slow Rise\n- The Wild Loaf\n- Crumb & Crust\n- Starter Club\n- Morning Proof\n\n"
     "Names that hint at sourdough's slow fermentation, like Slow Rise, tell customers what makes you "
     "different.",
     "I like Slow Rise. Can you write a one-line slogan for it?",
     "\"Slow Rise: bread that takes its time, so you do not have to.\""],
    ["What is the boiling point of water?",
     "At sea level, pure water boils at 100 degrees Celsius, which is 212 degrees Fahrenheit.",
     "Why does it boil at a lower temperature on a mountain?",
     "Water boils when its vapour pressure equals the pressure of the air above it. High on a mountain the "
     "air pressure is lower, so water reaches that point at a lower temperature: about 90 degrees Celsius at "
     "3,000 metres. That is why pasta takes longer to cook at altitude.",
     "Does adding salt change the boiling point?",
     "Yes, but only a little. Dissolved salt raises the boiling point, yet the amount used in cooking changes "
     "it by well under one degree. Cooks add salt for taste, not to make the water hotter."],
    ["Translate \"good morning\" into Spanish.",
     "\"Good morning\" in Spanish is \"buenos dias\".",
     "And how would I say \"good night\"?",
     "\"Good night\" is \"buenas noches\". It is used both as a greeting in the evening and when saying "
     "goodbye before bed."],
]

DEV_PROMPTS = [
    "How do I make my houseplants grow better in winter?",
    "What is the difference between weather and climate?",
    "Write a short poem about a train at night.",
    "How to Fold a Paper Airplane?",
    "Explain what a database index is.",
]

TEST_PROMPTS = [
    "What are some good ways to save money on groceries?",
    "Why do leaves change colour in autumn?",
    "Write a short story about a cat who becomes the mayor of a small town.",
    "How to Make Pancakes?",
    "Give me three tips for writing clear emails.",
]


def _wikihow_answer(title: str, steps: list[str]) -> str:
    lines = [f"The following steps explain how to {title[0].lower() + title[1:]}.", ""]
    lines += [f"{i}. {step}" for i, step in enumerate(steps, start=1)]
    lines += ["", "Take your time on the first try; it gets quicker with practice."]
    return "\n".join(lines)


def train_examples() -> list[dict]:
    """The forty demo training conversations, in LIMA's JSONL schema."""
    rows = [{"conversations": [q, a], "source": "stackexchange"} for q, a in STACKEXCHANGE]
    rows += [{"conversations": [q, a], "source": "authors"} for q, a in AUTHORS]
    rows += [{"conversations": [f"How to {t}?", _wikihow_answer(t, steps)], "source": "wikihow"}
             for t, steps in WIKIHOW]
    rows += [{"conversations": [f"{instruction}\n\n{text}", answer], "source": "nlp"}
             for instruction, text, answer in NLP]
    rows += [{"conversations": [p, s], "source": "writingprompts"} for p, s in WRITINGPROMPTS]
    rows += [{"conversations": list(turns), "source": "multi_turn"} for turns in MULTI_TURN]
    return rows


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_demo_data(out_dir: str) -> dict[str, str]:
    """Write train/dev/test .jsonl (LIMA format) into out_dir; returns {split file: path}."""
    os.makedirs(out_dir, exist_ok=True)
    files = {"train.jsonl": train_examples(),
             "dev.jsonl": [{"conversations": [p]} for p in DEV_PROMPTS],
             "test.jsonl": [{"conversations": [p]} for p in TEST_PROMPTS]}
    paths = {}
    for name, rows in files.items():
        paths[name] = os.path.join(out_dir, name)
        atomic_write_text(paths[name], _jsonl(rows))
    return paths


def all_text() -> list[str]:
    return [t for row in train_examples() for t in row["conversations"]] + DEV_PROMPTS + TEST_PROMPTS


def train_demo_tokenizer(out_dir: str, vocab_size: int = DEMO_VOCAB_SIZE) -> str:
    """Train the demo sentencepiece model on the demo text; returns the tokenizer.model path.

    LLaMA-like settings (BPE, byte fallback, digits split, unk=0, bos=1, eos=2, no pad), so EOT is
    `vocab_size` by lima_jax.tokenizer's rule.
    """
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(line for text in all_text() for line in text.split("\n") if line.strip()),
        model_writer=model, vocab_size=vocab_size, model_type="bpe", byte_fallback=True, split_digits=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        num_threads=1, minloglevel=2)
    path = os.path.join(out_dir, "tokenizer.model")
    atomic_write_bytes(path, model.getvalue())
    return path
