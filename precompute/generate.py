"""Built-in demo corpus: a seeded probabilistic grammar of English-like child-directed language.

The BabyLM corpus and BLiMP cannot be bundled, so `make demo` (and any user without them) gets
this instead: a few hundred words, Zipf-like frequencies, and real structure for a small model to
learn -- subject-verb agreement (also across a prepositional phrase or a relative clause, and with
coordinated subjects), determiner-noun and a/an agreement, do-support in questions and negation,
reflexives that agree with their subject, "I think that ..." embedding, verbs that choose their
objects (people eat food, read books), dialogue turns whose answers agree with the question
("Does Lily like the cake?" / "Yes, she does."), and stories whose characters are introduced once
and referred back to by name, noun and pronoun.

`write_corpus` writes it in BabyLM's layout (`child_speech.train`: one utterance per line with a
CHILDES-style speaker tag; `stories.train`: one paragraph per line). `write_minimal_pairs` writes
BLiMP-format jsonl files for the contrasts the grammar controls, drawn from the same grammar with
their own random streams, so a model trained on the corpus should prefer every `sentence_good`.
Both are deterministic: the same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import random
from pathlib import Path
from typing import Callable, NamedTuple

from configs import UserError
from configs.cli import exit_on_user_error
from storage.paths import make_folder, write_atomic

# --------------------------------------------------------------------------------------------
# Word tables. Within each table the order is the frequency rank (Zipf: weight 1 / rank).
# --------------------------------------------------------------------------------------------

# singular plural category gender (m, f, n = it, x = a person of either gender)
NOUN_TABLE = """
dog dogs animal n | ball balls toy n | boy boys person m | cookie cookies food n
girl girls person f | book books text n | cat cats animal n | baby babies person x
box boxes thing n | park parks place n | apple apples food n | bird birds animal n
cup cups thing n | friend friends person x | doll dolls toy n | house houses place n
duck ducks animal n | banana bananas food n | hat hats thing n | block blocks toy n
man men person m | bunny bunnies animal n | cake cakes food n | story stories text n
shoe shoes thing n | truck trucks toy n | garden gardens place n | woman women person f
puppy puppies animal n | sandwich sandwiches food n | bed beds thing n | car cars toy n
kid kids person x | bear bears animal n | egg eggs food n | spoon spoons thing n
kitchen kitchens place n | train trains toy n | teacher teachers person x | cow cows animal n
chair chairs thing n | carrot carrots food n | letter letters text n | kite kites toy n
horse horses animal n | brother brothers person m | table tables thing n | store stores place n
cracker crackers food n | pig pigs animal n | sister sisters person f | door doors thing n
puzzle puzzles toy n | frog frogs animal n | grape grapes food n | zoo zoos place n
sock socks thing n | child children person x | mouse mice animal n | balloon balloons toy n
orange oranges food n | bag bags thing n | farm farms place n | monkey monkeys animal n
card cards text n | window windows thing n | farmer farmers person x | crayon crayons toy n
rabbit rabbits animal n | strawberry strawberries food n | bowl bowls thing n | beach beaches place n
elephant elephants animal n | doctor doctors person x | drum drums toy n | muffin muffins food n
blanket blankets thing n | school schools place n | owl owls animal n | king kings person m
boat boats toy n | key keys thing n | lion lions animal n | cherry cherries food n
map maps text n | flower flowers thing n | queen queens person f | yard yards place n
fox foxes animal n | robot robots toy n | tree trees thing n | potato potatoes food n
chicken chickens animal n | princess princesses person f | rock rocks thing n | pond ponds place n
pancake pancakes food n | turtle turtles animal n | puppet puppets toy n | stick sticks thing n
prince princes person m | squirrel squirrels animal n | forest forests place n | bone bones food n
leaf leaves thing n | grandma grandmas person f | tiger tigers animal n | pie pies food n
star stars thing n | room rooms place n | goat goats animal n | grandpa grandpas person m
picture pictures thing n | castle castles place n | wolf wolves animal n | noodle noodles food n
bottle bottles thing n | river rivers place n | umbrella umbrellas thing n | giant giants person m
basket baskets thing n | hill hills place n | pillow pillows thing n | shell shells thing n
"""

NAME_TABLE = """
Mommy f | Daddy m | Sam m | Lily f | Max m | Emma f | Ben m | Mia f | Tom m | Anna f | Jack m
Lucy f | Grandma f | Grandpa m | Leo m | Rosie f | Pip m | Molly f | Ollie m | Zoe f | Oscar m
Ella f | Eddie m | Amy f | Teddy m | Ruby f
"""

# word, what it describes: a = people and animals, t = things, b = both
ADJECTIVE_TABLE = """
big b | little b | good b | happy a | nice b | red t | hungry a | small b | blue t | funny a
tired a | pretty b | silly a | new t | hot t | cold b | sad a | green t | soft t | old b
yellow t | dirty b | clean t | sleepy a | brown b | wet b | tiny b | fast b | scared a | brave a
kind a | orange t | angry a | empty t | loud b | shiny t | fluffy a | strong a | heavy t
round t | sticky t | gentle a
"""

ALL = "person,animal,food,toy,text,thing,place"
# base 3sg past -ing participle, kind (i: intransitive, m: motion (takes "to the park"),
# t: transitive, r: transitive and reflexive), object categories
VERB_TABLE = f"""
go goes went going gone m -
want wants wanted wanting wanted t food,toy,thing,text,animal
see sees saw seeing seen r {ALL}
like likes liked liking liked r {ALL}
eat eats ate eating eaten t food
play plays played playing played i -
have has had having had t food,toy,thing,text,animal
run runs ran running run m -
find finds found finding found t toy,thing,animal,text,food
sleep sleeps slept sleeping slept i -
love loves loved loving loved r person,animal,food,toy,text
jump jumps jumped jumping jumped i -
need needs needed needing needed t food,toy,thing,text
hold holds held holding held t toy,thing,animal,food
read reads read reading read t text
help helps helped helping helped r person,animal
push pushes pushed pushing pushed t toy,thing
throw throws threw throwing thrown t toy,food
sing sings sang singing sung i -
walk walks walked walking walked m -
hug hugs hugged hugging hugged t person,animal,toy
wash washes washed washing washed r thing,animal,toy,person
cry cries cried crying cried i -
draw draws drew drawing drawn r animal,person,thing,place
come comes came coming come m -
chase chases chased chasing chased t animal,person,toy
laugh laughs laughed laughing laughed i -
catch catches caught catching caught t toy,animal
feed feeds fed feeding fed t animal,person
swim swims swam swimming swum i -
open opens opened opening opened t thing,text
bring brings brought bringing brought t toy,thing,food,text
dance dances danced dancing danced i -
kiss kisses kissed kissing kissed t person,animal
take takes took taking taken t toy,thing,food
sit sits sat sitting sat i -
make makes made making made t food,toy
drop drops dropped dropping dropped t toy,thing,food
hide hides hid hiding hidden i -
break breaks broke breaking broken t toy,thing
fix fixes fixed fixing fixed t toy,thing
carry carries carried carrying carried t toy,thing,animal,food
smile smiles smiled smiling smiled i -
share shares shared sharing shared t food,toy
visit visits visited visiting visited t person,place
wait waits waited waiting waited i -
clean cleans cleaned cleaning cleaned t thing,place,toy
hurt hurts hurt hurting hurt r person,animal
fall falls fell falling fallen i -
climb climbs climbed climbing climbed i -
fly flies flew flying flown m -
tickle tickles tickled tickling tickled t person,animal
paint paints painted painting painted r thing,toy,place,person
"""

SINGULAR_DETERMINERS = "the a my this that your his her our every their each".split()
PLURAL_DETERMINERS = "the my these some those your two many three our his her their".split()
DEMONSTRATIVE_SWAP = {"this": "these", "that": "those", "these": "this", "those": "that"}
LOCATIVE_PREPOSITIONS = {"place": "in at near".split(), "thing": "on under in near behind".split(),
                         "animal": "with near behind".split(), "person": "with near behind".split()}
MODIFIER_PREPOSITIONS = "near with behind beside under".split()
ADVERBS = "now today again too here there outside later".split()
EMBEDDING_VERBS = [("think", "thinks"), ("know", "knows"), ("say", "says"), ("hope", "hopes")]
STORY_OPENERS = ["then,", "one day,", "after that,", "suddenly,", "later,", "the next day,"]
INTERJECTIONS = [("okay", "."), ("yes", "."), ("look", "!"), ("no", "."), ("good job", "!"),
                 ("wow", "!"), ("uh oh", "!"), ("thank you", "."), ("oh no", "!"), ("all done", "."),
                 ("night night", "."), ("here you go", ".")]

# Subject pronouns: word, agreement (1sg: am/was; 3sg: is/was/-s; pl: are/were, bare verb),
# gender, person. "you" agrees like a plural.
PRONOUNS = [("I", "1sg", "x", 1), ("you", "pl", "x", 2), ("it", "3sg", "n", 3),
            ("he", "3sg", "m", 3), ("she", "3sg", "f", 3), ("we", "pl", "x", 1),
            ("they", "pl", "x", 3)]
OBJECT_PRONOUN = {"I": "me", "you": "you", "it": "it", "he": "him", "she": "her", "we": "us",
                  "they": "them"}
REFLEXIVE = {("3sg", "m"): "himself", ("3sg", "f"): "herself", ("3sg", "n"): "itself",
             ("pl", 3): "themselves", ("1sg", 1): "myself", ("pl", 1): "ourselves",
             ("pl", 2): "yourself"}
BE = {("1sg", False): "am", ("3sg", False): "is", ("pl", False): "are",
      ("1sg", True): "was", ("3sg", True): "was", ("pl", True): "were"}
BE_NOT = {"3sg": "isn't", "pl": "aren't"}
SWAP_PERSON = {"I": ("you", "pl"), "you": ("I", "1sg")}


class Noun(NamedTuple):
    sg: str
    pl: str
    category: str
    gender: str


class Verb(NamedTuple):
    base: str
    s3: str
    past: str
    ing: str
    part: str
    kind: str
    objects: tuple[str, ...]


class Mention(NamedTuple):
    """A noun phrase with what agreement needs: agr is '1sg', '3sg' or 'pl'."""
    words: list[str]
    agr: str
    gender: str
    person: int = 3
    animate: bool = True


class Clause(NamedTuple):
    """A generated present-tense clause: `words[verb_at]` is the verb agreeing with `agr`."""
    words: list[str]
    agr: str
    verb_at: int


def _cells(table: str) -> list[list[str]]:
    return [cell.split() for line in table.strip().splitlines() for cell in line.split("|")]


NOUNS = [Noun(*row) for row in _cells(NOUN_TABLE)]
NAMES = [(name, gender) for name, gender in _cells(NAME_TABLE)]
ADJECTIVES = [(word, kind) for word, kind in _cells(ADJECTIVE_TABLE)]
VERBS = [Verb(*row[:6], tuple(row[6].split(",")) if row[6] != "-" else ())
         for row in (line.split() for line in VERB_TABLE.strip().splitlines())]


def vocabulary() -> set[str]:
    """Every word form the grammar can produce (lowercase, no punctuation)."""
    words = {w for n in NOUNS for w in (n.sg, n.pl)} | {n.lower() for n, _ in NAMES}
    words |= {a for a, _ in ADJECTIVES} | {f for v in VERBS for f in v[:5]}
    words |= set(SINGULAR_DETERMINERS + PLURAL_DETERMINERS + MODIFIER_PREPOSITIONS + ADVERBS)
    words |= {w for preps in LOCATIVE_PREPOSITIONS.values() for w in preps}
    words |= {w for pair in EMBEDDING_VERBS for w in pair}
    words |= {p.lower() for p, *_ in PRONOUNS} | set(OBJECT_PRONOUN.values())
    words |= set(REFLEXIVE.values()) | set(BE.values()) | set(BE_NOT.values())
    words |= {w.strip(",") for phrase in STORY_OPENERS for w in phrase.split()}
    words |= {w for phrase, _ in INTERJECTIONS for w in phrase.split()}
    words |= set("an that and to home does do doesn't don't did didn't has have can can't not "
                 "what where who doing very there once upon a time named lived happily ever "
                 "after end every day said asked thought let's give me at yes no come here "
                 "was were met together".split())
    return words


# --------------------------------------------------------------------------------------------
# Zipf sampling: a table is (items, cumulative weights); one draw is one bisect.
# --------------------------------------------------------------------------------------------

def zipf(items: list, exponent: float = 1.0) -> tuple[list, list[float]]:
    weights = (1.0 / (rank + 1) ** exponent for rank in range(len(items)))
    return list(items), list(itertools.accumulate(weights))


def draw(rng: random.Random, table: tuple[list, list[float]]):
    items, cum = table
    return items[bisect.bisect(cum, rng.random() * cum[-1])]


def _nouns(categories) -> tuple[list, list[float]]:
    return zipf([n for n in NOUNS if n.category in categories])


ANIMATE = ("person", "animal")
ANIMATE_NOUNS = _nouns(ANIMATE)
THING_NOUNS = _nouns(("food", "toy", "thing", "text"))
PLACE_NOUNS = _nouns(("place",))
ANY_NOUNS = zipf(NOUNS)
OBJECT_NOUNS = {v: _nouns(v.objects) for v in VERBS if v.objects}
VERBS_TAKING = {category: zipf([v for v in VERBS if category in v.objects])
                for category in {n.category for n in NOUNS}}
PROP_NOUNS = _nouns(("toy", "food"))
NAME_DRAW = zipf(NAMES)
ADJECTIVES_FOR = {True: zipf([a for a, kind in ADJECTIVES if kind in "ab"]),
                  False: zipf([a for a, kind in ADJECTIVES if kind in "tb"])}
SINGULAR_DET_DRAW = zipf(SINGULAR_DETERMINERS)
EXISTENTIAL_DETERMINERS = {False: zipf(["a"]), True: zipf(["some", "two", "many", "three"])}
PLURAL_DET_DRAW = zipf(PLURAL_DETERMINERS)
PRONOUN_DRAW = zipf(PRONOUNS)
ALL_VERBS = zipf(VERBS)
TRANSITIVE = zipf([v for v in VERBS if v.kind in "tr"])
INTRANSITIVE = zipf([v for v in VERBS if v.kind in "im"])
REFLEXIVE_VERBS = zipf([v for v in VERBS if v.kind == "r"])
ADVERB_DRAW = zipf(ADVERBS)
INTERJECTION_DRAW = zipf(INTERJECTIONS)


# --------------------------------------------------------------------------------------------
# Phrases
# --------------------------------------------------------------------------------------------

def with_article(words: list[str]) -> list[str]:
    """'a' becomes 'an' before a vowel (the tables avoid words like 'hour' and 'unicorn')."""
    for i in range(len(words) - 1):
        if words[i] == "a" and words[i + 1][0] in "aeiou":
            words[i] = "an"
    return words


def noun_phrase(rng: random.Random, noun: Noun, plural: bool, *, adjective: float = 0.25,
                determiners=None) -> list[str]:
    """Determiner (agreeing in number) + optional adjective + noun."""
    det = draw(rng, determiners or (PLURAL_DET_DRAW if plural else SINGULAR_DET_DRAW))
    words = [det]
    if rng.random() < adjective:
        words.append(draw(rng, ADJECTIVES_FOR[noun.category in ANIMATE]))
    words.append(noun.pl if plural else noun.sg)
    return with_article(words)


def noun_mention(rng: random.Random, noun: Noun, plural: bool, **kwargs) -> Mention:
    gender = rng.choice("mf") if noun.gender == "x" else noun.gender
    return Mention(noun_phrase(rng, noun, plural, **kwargs), "pl" if plural else "3sg", gender,
                   animate=noun.category in ANIMATE)


def name_mention(rng: random.Random) -> Mention:
    name, gender = draw(rng, NAME_DRAW)
    return Mention([name], "3sg", gender)


def pronoun_mention(rng: random.Random) -> Mention:
    word, agr, gender, person = draw(rng, PRONOUN_DRAW)
    return Mention([word], agr, gender, person)


def present(verb: Verb, agr: str) -> str:
    return verb.s3 if agr == "3sg" else verb.base


def other_form(word: str, verb: Verb) -> str:
    """The present-tense form of `verb` with the other number (runs <-> run)."""
    return verb.base if word == verb.s3 else verb.s3


def reflexive(m: Mention) -> str:
    if m.agr == "3sg":
        return REFLEXIVE[("3sg", m.gender)]
    return REFLEXIVE[(m.agr, m.person)]


def referring_pronoun(m: Mention) -> Mention:
    """The subject pronoun that refers back to `m` (I and you swap: the answerer is speaking)."""
    word = m.words[0] if m.person != 3 else None
    if word in SWAP_PERSON:
        swapped, agr = SWAP_PERSON[word]
        return Mention([swapped], agr, m.gender, 1 if swapped == "I" else 2)
    if m.person != 3:
        return m
    if m.agr == "pl":
        return Mention(["they"], "pl", m.gender)
    return Mention([{"m": "he", "f": "she", "n": "it"}[m.gender]], "3sg", m.gender)


def modified_subject(rng: random.Random, head: Noun, plural: bool) -> Mention:
    """NP + prepositional phrase or relative clause, whose inner noun may have the other number:
    'the dog near the cats', 'the dog that chases the cats', 'the dog that the cats like'."""
    subject = noun_mention(rng, head, plural, adjective=0.1)
    inner_plural = rng.random() < 0.5
    r = rng.random()
    if r < 0.5:
        inner = noun_phrase(rng, draw(rng, ANY_NOUNS), inner_plural, adjective=0.1)
        tail = [rng.choice(MODIFIER_PREPOSITIONS)] + inner
    elif r < 0.75:
        verb = draw(rng, TRANSITIVE)
        obj = noun_phrase(rng, draw(rng, OBJECT_NOUNS[verb]), inner_plural, adjective=0.1)
        tail = ["that", present(verb, subject.agr)] + obj
    else:
        verb = draw(rng, VERBS_TAKING[head.category])
        inner = (noun_mention(rng, draw(rng, ANIMATE_NOUNS), inner_plural, adjective=0.1)
                 if rng.random() < 0.7 else name_mention(rng))
        tail = ["that"] + inner.words + [present(verb, inner.agr)]
    return subject._replace(words=subject.words + tail)


def subject(rng: random.Random, *, modifier: float = 0.45) -> Mention:
    """An animate subject: pronoun, name, or noun phrase (sometimes with a modifier)."""
    r = rng.random()
    if r < 0.3:
        return pronoun_mention(rng)
    if r < 0.5:
        return name_mention(rng)
    noun, plural = draw(rng, ANIMATE_NOUNS), rng.random() < 0.4
    if rng.random() < modifier:
        return modified_subject(rng, noun, plural)
    return noun_mention(rng, noun, plural)


def thing_subject(rng: random.Random) -> Mention:
    return noun_mention(rng, draw(rng, THING_NOUNS), rng.random() < 0.35)


def verb_object(rng: random.Random, verb: Verb) -> list[str]:
    """An object the verb selects: 'eat' takes food, 'read' takes books and letters."""
    if rng.random() < 0.12:
        return [OBJECT_PRONOUN[draw(rng, PRONOUN_DRAW)[0]]]
    return noun_phrase(rng, draw(rng, OBJECT_NOUNS[verb]), rng.random() < 0.3)


def locative(rng: random.Random) -> list[str]:
    noun = draw(rng, PLACE_NOUNS) if rng.random() < 0.5 else draw(rng, ANY_NOUNS)
    preps = LOCATIVE_PREPOSITIONS.get(noun.category, LOCATIVE_PREPOSITIONS["thing"])
    return [rng.choice(preps)] + noun_phrase(rng, noun, rng.random() < 0.15, adjective=0.1)


def complement(rng: random.Random, verb: Verb) -> list[str]:
    """What follows a verb: its object, or for intransitives an optional place or adverb."""
    if verb.objects:
        return verb_object(rng, verb)
    r = rng.random()
    if verb.kind == "m" and r < 0.4:
        return ["to"] + noun_phrase(rng, draw(rng, PLACE_NOUNS), False, adjective=0.05)
    if verb.kind == "m" and r < 0.5:
        return ["home"]
    if r < 0.7:
        return locative(rng)
    return [draw(rng, ADVERB_DRAW)] if r < 0.9 else []


def predicate_adjective(rng: random.Random, m: Mention) -> list[str]:
    adjective = draw(rng, ADJECTIVES_FOR[m.animate])
    return ["very", adjective] if rng.random() < 0.15 else [adjective]


def simple_clause(rng: random.Random, m: Mention | None = None) -> Clause:
    """Subject + present-tense verb agreeing with it + complement: 'the dog near the cats runs'."""
    m = m or subject(rng)
    verb = draw(rng, ALL_VERBS)
    return Clause(m.words + [present(verb, m.agr)] + complement(rng, verb), m.agr, len(m.words))


def sentence(words: list[str], end: str = ".") -> str:
    """Capitalise the first word, join, and end with punctuation."""
    text = " ".join(words)
    return text[0].upper() + text[1:] + end


# --------------------------------------------------------------------------------------------
# The speech register: statements, questions and answers between speakers
# --------------------------------------------------------------------------------------------

def statement(rng: random.Random) -> list[str]:
    """One declarative utterance, present tense mostly."""
    r = rng.random()
    if r < 0.30:
        return simple_clause(rng).words
    m = subject(rng)
    if r < 0.42:
        verb = draw(rng, ALL_VERBS)
        return m.words + [BE[(m.agr, False)], verb.ing] + complement(rng, verb)
    if r < 0.50:
        m = m if rng.random() < 0.6 else thing_subject(rng)
        return m.words + [BE[(m.agr, rng.random() < 0.2)]] + predicate_adjective(rng, m)
    if r < 0.55:
        m = thing_subject(rng)
        return m.words + [BE[(m.agr, False)]] + locative(rng)
    if r < 0.65:
        verb = draw(rng, ALL_VERBS)
        if m.agr == "1sg" or rng.random() < 0.6:
            aux = "doesn't" if m.agr == "3sg" else "don't"
            return m.words + [aux, verb.base] + complement(rng, verb)
        return m.words + [BE_NOT[m.agr], verb.ing] + complement(rng, verb)
    if r < 0.73:
        verb = draw(rng, ALL_VERBS)
        return m.words + [verb.past] + complement(rng, verb)
    if r < 0.77:
        verb = draw(rng, ALL_VERBS)
        return m.words + ["has" if m.agr == "3sg" else "have", verb.part] + complement(rng, verb)
    if r < 0.83:
        matrix = pronoun_mention(rng) if rng.random() < 0.6 else name_mention(rng)
        thinks = rng.choice(EMBEDDING_VERBS)[matrix.agr == "3sg"]
        that = ["that"] if rng.random() < 0.6 else []
        return matrix.words + [thinks] + that + simple_clause(rng, m).words
    if r < 0.88:
        verb = draw(rng, REFLEXIVE_VERBS)
        return m.words + [present(verb, m.agr), reflexive(m)]
    if r < 0.93:
        first = name_mention(rng)
        second = name_mention(rng) if rng.random() < 0.5 else noun_mention(
            rng, draw(rng, ANIMATE_NOUNS), rng.random() < 0.4)
        if rng.random() < 0.5:
            return first.words + ["and"] + second.words + ["are"] + predicate_adjective(rng, first)
        verb = draw(rng, ALL_VERBS)
        return first.words + ["and"] + second.words + [verb.base] + complement(rng, verb)
    plural = rng.random() < 0.4
    noun = draw(rng, ANY_NOUNS)
    some = noun_phrase(rng, noun, plural, determiners=EXISTENTIAL_DETERMINERS[plural])
    return ["there", "are" if plural else "is"] + some + locative(rng)


def imperative(rng: random.Random) -> tuple[list[str], str]:
    r = rng.random()
    verb = draw(rng, ALL_VERBS)
    if r < 0.3:
        return ["look", "at"] + noun_phrase(rng, draw(rng, ANY_NOUNS), rng.random() < 0.3), "!"
    if r < 0.5:
        return ["don't", verb.base] + complement(rng, verb), "!"
    if r < 0.7:
        return ["let's", verb.base] + complement(rng, verb), "."
    if r < 0.85:
        return ["give", "me"] + noun_phrase(rng, draw(rng, THING_NOUNS), rng.random() < 0.3), "."
    return [verb.base] + complement(rng, verb), "!"


def yes_no_exchange(rng: random.Random) -> tuple[list[str], list[str]]:
    """A yes/no question and an answer whose pronoun and auxiliary agree with its subject."""
    m = subject(rng, modifier=0.05)
    verb = draw(rng, ALL_VERBS)
    answer = referring_pronoun(m)
    yes = rng.random() < 0.6
    r = rng.random()
    if r < 0.5 or m.agr == "1sg":
        question = [("does" if m.agr == "3sg" else "do")] + m.words + [verb.base]
        aux = "does" if answer.agr == "3sg" else "do"
        reply = aux if yes else aux + "n't"
    elif r < 0.8:
        question = [BE[(m.agr, False)]] + m.words + [verb.ing]
        reply = BE[(answer.agr, False)] if yes else BE_NOT.get(answer.agr, "am not")
    else:
        question = ["did"] + m.words + [verb.base]
        reply = "did" if yes else "didn't"
    question += complement(rng, verb)
    return question, [("yes," if yes else "no,")] + answer.words + reply.split()


def wh_exchange(rng: random.Random) -> tuple[list[str], list[str]]:
    r = rng.random()
    if r < 0.35:
        noun, plural = draw(rng, ANY_NOUNS), rng.random() < 0.35
        m = noun_mention(rng, noun, plural, adjective=0.1)
        answer = referring_pronoun(m) if rng.random() < 0.6 else m
        return (["where", BE[(m.agr, False)]] + m.words,
                answer.words + [BE[(answer.agr, False)]] + locative(rng))
    verb = draw(rng, TRANSITIVE)
    if r < 0.7:
        m = subject(rng, modifier=0.03)
        answer = referring_pronoun(m)
        obj = noun_phrase(rng, draw(rng, OBJECT_NOUNS[verb]), rng.random() < 0.3)
        if rng.random() < 0.6:
            return (["what", "does" if m.agr == "3sg" else "do"] + m.words + [verb.base],
                    answer.words + [present(verb, answer.agr)] + obj)
        return (["what", BE[(m.agr, False)]] + m.words + [verb.ing],
                answer.words + [BE[(answer.agr, False)], verb.ing] + obj)
    who = subject(rng, modifier=0)
    who = who if who.person == 3 else name_mention(rng)
    question = ["who", verb.s3] + verb_object(rng, verb)
    return question, who.words + ["does" if who.agr == "3sg" else "do"]


def speech_lines(rng: random.Random) -> list[str]:
    """One exchange: a few lines of '*SPK: utterance', as in CHILDES transcripts."""
    adult = "MOT" if rng.random() < 0.75 else "FAT"
    r = rng.random()
    if r < 0.22:
        question, answer = yes_no_exchange(rng)
        return [f"*{adult}: {sentence(question, '?')}", f"*CHI: {sentence(answer)}"]
    if r < 0.40:
        question, answer = wh_exchange(rng)
        return [f"*{adult}: {sentence(question, '?')}", f"*CHI: {sentence(answer)}"]
    lines = []
    for _ in range(rng.randint(1, 3)):
        speaker = adult if rng.random() < 0.7 else "CHI"
        r = rng.random()
        if r < 0.65:
            lines.append(f"*{speaker}: {sentence(statement(rng))}")
        elif r < 0.85:
            words, end = imperative(rng)
            lines.append(f"*{speaker}: {sentence(words, end)}")
        else:
            words, end = draw(rng, INTERJECTION_DRAW)
            lines.append(f"*{speaker}: {sentence(words.split(), end)}")
    return lines


# --------------------------------------------------------------------------------------------
# The story register: paragraphs about characters introduced once and referred back to
# --------------------------------------------------------------------------------------------

# Story heroes are drawn flatter than Zipf so that paragraphs are not all about dogs, and are
# never called Mommy or Grandpa.
HERO_NOUNS = zipf(ANIMATE_NOUNS[0], exponent=0.5)
HERO_NAMES = zipf([(n, g) for n, g in NAMES if n not in ("Mommy", "Daddy", "Grandma", "Grandpa")])


class Character(NamedTuple):
    name: str | None
    noun: Noun
    gender: str
    plural: bool


def new_character(rng: random.Random) -> Character:
    """A named animal or person (a girl gets a girl's name), or an unnamed group."""
    noun = draw(rng, HERO_NOUNS)
    if rng.random() < 0.2:
        return Character(None, noun, "x", True)
    name, gender = draw(rng, HERO_NAMES)
    while noun.gender in "mf" and gender != noun.gender:
        name, gender = draw(rng, HERO_NAMES)
    return Character(name, noun, gender, False)


def refer(rng: random.Random, c: Character, *, pronoun: float = 0.35) -> Mention:
    """The character by pronoun, name, or 'the <noun>'."""
    agr = "pl" if c.plural else "3sg"
    r = rng.random()
    if r < pronoun:
        word = "they" if c.plural else {"m": "he", "f": "she", "n": "it"}[c.gender]
        return Mention([word], agr, c.gender)
    if c.name and r < 0.75:
        return Mention([c.name], agr, c.gender)
    return Mention(["the", c.noun.pl if c.plural else c.noun.sg], agr, c.gender)


def introduce(rng: random.Random, c: Character) -> list[str]:
    adjective = draw(rng, ADJECTIVES_FOR[True])
    if c.plural:
        count = rng.choice(["two", "three", "some", "many"])
        return ["once", "upon", "a", "time,", "there", "were", count, adjective, c.noun.pl]
    intro = with_article(["a", adjective, c.noun.sg])
    if rng.random() < 0.5:
        return ["once", "upon", "a", "time,", "there", "was"] + intro + ["named", c.name]
    return [c.name, "was"] + intro


def story_sentence(rng: random.Random, hero: Character, friend: Character, prop: Noun,
                   friend_known: bool) -> tuple[str, bool]:
    """One past-tense sentence (or a quotation) about the hero or the friend, often doing
    something with the story's prop ('the ball', 'it')."""
    who = hero if rng.random() < 0.75 or not friend_known else friend
    m = refer(rng, who)
    verb = draw(rng, ALL_VERBS)
    r = rng.random()
    if r < 0.12 and not friend_known:
        met = noun_phrase(rng, friend.noun, friend.plural, adjective=0.4,
                          determiners=zipf(["a"] if not friend.plural else ["some", "two"]))
        return sentence(refer(rng, hero).words + [rng.choice(["saw", "met", "found"])] + met), True
    if r < 0.2:
        verb = draw(rng, VERBS_TAKING[prop.category])
        words = m.words + [verb.past] + (["it"] if rng.random() < 0.3 else ["the", prop.sg])
    elif r < 0.3:
        words = m.words + [verb.past] + complement(rng, verb)
    elif r < 0.42:
        words = m.words + [BE[(m.agr, True)]] + predicate_adjective(rng, m)
    elif r < 0.54:
        speaker = refer(rng, who, pronoun=0)
        if rng.random() < 0.6:
            return f'"{sentence(statement(rng), ",")}" said {" ".join(speaker.words)}.', friend_known
        question, _ = yes_no_exchange(rng) if rng.random() < 0.5 else wh_exchange(rng)
        return f'"{sentence(question, "?")}" asked {" ".join(speaker.words)}.', friend_known
    elif r < 0.62:
        words = m.words + ["didn't", "want", "to", verb.base] + complement(rng, verb)
    elif r < 0.70:
        words = m.words + [BE[(m.agr, True)], verb.ing] + complement(rng, verb)
    elif r < 0.78:
        words = ["every", "day,"] + m.words + [present(verb, m.agr)] + complement(rng, verb)
    elif r < 0.84 and friend_known:
        both = refer(rng, hero, pronoun=0).words + ["and"] + refer(rng, friend, pronoun=0).words
        words = both + (["were"] + predicate_adjective(rng, m) if rng.random() < 0.5
                        else [draw(rng, INTRANSITIVE).past, "together"])
    elif r < 0.90:
        inner = refer(rng, hero if who is friend else friend) if friend_known \
            else refer(rng, who, pronoun=1)
        words = m.words + ["thought", "that"] + inner.words + [BE[(inner.agr, True)]] + \
            predicate_adjective(rng, inner)
    elif r < 0.95:
        verb = draw(rng, REFLEXIVE_VERBS)
        words = m.words + [verb.past, reflexive(m)]
    else:
        words = [rng.choice(STORY_OPENERS)] + m.words + [verb.past] + complement(rng, verb)
    return sentence(words), friend_known


def story(rng: random.Random) -> str:
    """One paragraph: an introduction, a prop, 3-8 sentences, and sometimes a closing line."""
    hero, friend, prop = new_character(rng), new_character(rng), draw(rng, PROP_NOUNS)
    # The friend is met as "a duck", then called "the duck" or "it": it has no name.
    friend = friend._replace(name=None, gender=friend.noun.gender if friend.noun.gender in "mfn"
                             else friend.gender)
    m = refer(rng, hero)
    has = m.words + [rng.choice(["had", "found", "wanted"])] + noun_phrase(
        rng, prop, False, adjective=0.6, determiners=zipf(["a"]))
    sentences, friend_known = [sentence(introduce(rng, hero)), sentence(has)], False
    for _ in range(rng.randint(3, 7)):
        text, friend_known = story_sentence(rng, hero, friend, prop, friend_known)
        sentences.append(text)
    if rng.random() < 0.3:
        m = refer(rng, hero, pronoun=0.6)
        sentences.append(sentence(m.words + [BE[(m.agr, True)], "very", "happy"]))
    return " ".join(sentences)


# --------------------------------------------------------------------------------------------
# Corpus files
# --------------------------------------------------------------------------------------------

REGISTERS = {"child_speech": (0.55, speech_lines), "stories": (0.45, lambda rng: [story(rng)])}


def write_corpus(out_dir: Path | str, *, words: int, seed: int) -> dict:
    """Write `<register>.train` files totalling about `words` whitespace-separated words.

    Returns {"files": {filename: {"words", "lines"}}, "words", "lines", "seed"}.
    The same (words, seed) gives byte-identical files.
    """
    if words <= 0:
        raise UserError(f"generated corpus size must be positive, got {words} words")
    out_dir = Path(out_dir)
    make_folder(out_dir)
    files = {}
    for register, (share, generate) in REGISTERS.items():
        rng = random.Random(f"{seed}:corpus:{register}")
        target, count, lines = max(1, round(words * share)), 0, []
        while count < target:
            for line in generate(rng):
                lines.append(line)
                count += line.count(" ") + 1
        write_atomic(out_dir / f"{register}.train", "\n".join(lines) + "\n")
        files[f"{register}.train"] = {"words": count, "lines": len(lines)}
    return {"files": files, "words": sum(f["words"] for f in files.values()),
            "lines": sum(f["lines"] for f in files.values()), "seed": seed}


# --------------------------------------------------------------------------------------------
# Minimal pairs: each maker returns (good words, position of the contrast, bad word, end mark)
# --------------------------------------------------------------------------------------------

def _np_subject(rng: random.Random, plural: bool, *, animate: bool = True) -> Mention:
    noun = draw(rng, ANIMATE_NOUNS if animate else THING_NOUNS)
    return noun_mention(rng, noun, plural, adjective=0.2)


def _plain_subject(rng: random.Random) -> Mention:
    r = rng.random()
    if r < 0.15:
        m = pronoun_mention(rng)
        return m if m.agr != "1sg" else Mention(["she"], "3sg", "f")
    return name_mention(rng) if r < 0.35 else _np_subject(rng, rng.random() < 0.5)


def pair_subject_verb(rng):
    """The dog runs. / The dog run."""
    m, verb = _plain_subject(rng), draw(rng, ALL_VERBS)
    good = present(verb, m.agr)
    return m.words + [good] + complement(rng, verb), len(m.words), other_form(good, verb), "."


def pair_across_pp(rng):
    """The dog near the cats runs. / The dog near the cats run."""
    plural = rng.random() < 0.5
    m = _np_subject(rng, plural)
    attractor = noun_phrase(rng, draw(rng, ANY_NOUNS), not plural, adjective=0.1)
    verb = draw(rng, ALL_VERBS)
    words = m.words + [rng.choice(MODIFIER_PREPOSITIONS)] + attractor
    good = present(verb, m.agr)
    return words + [good] + complement(rng, verb), len(words), other_form(good, verb), "."


def pair_across_relative_clause(rng):
    """The dog that the cats like runs. / ... run.  The dog that chases the cats runs. / ... run."""
    plural = rng.random() < 0.5
    head = draw(rng, ANIMATE_NOUNS)
    m = noun_mention(rng, head, plural, adjective=0.1)
    if rng.random() < 0.5:
        verb = draw(rng, VERBS_TAKING[head.category])
        inner = noun_mention(rng, draw(rng, ANIMATE_NOUNS), not plural, adjective=0.1)
        words = m.words + ["that"] + inner.words + [present(verb, inner.agr)]
    else:
        verb = draw(rng, TRANSITIVE)
        inner = noun_phrase(rng, draw(rng, OBJECT_NOUNS[verb]), not plural, adjective=0.1)
        words = m.words + ["that", present(verb, m.agr)] + inner
    verb = draw(rng, ALL_VERBS)
    good = present(verb, m.agr)
    return words + [good] + complement(rng, verb), len(words), other_form(good, verb), "."


def pair_coordinated_subject(rng):
    """Sam and the dog are happy. / Sam and the dog is happy."""
    first = name_mention(rng)
    second = name_mention(rng) if rng.random() < 0.5 else _np_subject(rng, False)
    words = first.words + ["and"] + second.words
    if rng.random() < 0.5:
        return words + ["are"] + predicate_adjective(rng, first), len(words), "is", "."
    verb = draw(rng, ALL_VERBS)
    return words + [verb.base] + complement(rng, verb), len(words), verb.s3, "."


def pair_copula(rng):
    """The dogs are hungry. / The dogs is hungry."""
    plural, past = rng.random() < 0.5, rng.random() < 0.3
    m = _np_subject(rng, plural, animate=rng.random() < 0.6) if rng.random() < 0.8 \
        else name_mention(rng)
    be = BE[(m.agr, past)]
    rest = predicate_adjective(rng, m) if rng.random() < 0.6 else locative(rng)
    bad = {"is": "are", "are": "is", "was": "were", "were": "was"}[be]
    return m.words + [be] + rest, len(m.words), bad, "."


def _object_pair(rng, determiners: list[str], plural: bool):
    m, verb = _plain_subject(rng), draw(rng, TRANSITIVE)
    obj = noun_phrase(rng, draw(rng, OBJECT_NOUNS[verb]), plural, adjective=0.3,
                      determiners=zipf(determiners))
    return m.words + [verb.past] + obj, len(m.words) + 1


def pair_determiner_noun(rng):
    """Sam found these balls. / Sam found this balls."""
    plural = rng.random() < 0.5
    words, at = _object_pair(rng, ["these", "those"] if plural else ["this", "that"], plural)
    return words, at, DEMONSTRATIVE_SWAP[words[at]], "."


def pair_indefinite_article(rng):
    """Sam ate an apple. / Sam ate a apple.  Half the pairs have a vowel after the article."""
    vowel = rng.random() < 0.5
    words, at = _object_pair(rng, ["a"], False)
    while (words[at] == "an") != vowel:
        words, at = _object_pair(rng, ["a"], False)
    return words, at, "a" if words[at] == "an" else "an", "."


def pair_negation(rng):
    """The dog doesn't run. / The dog don't run."""
    m, verb = _plain_subject(rng), draw(rng, ALL_VERBS)
    if rng.random() < 0.7:
        aux, bad, form = ("doesn't", "don't", verb.base) if m.agr == "3sg" \
            else ("don't", "doesn't", verb.base)
    else:
        aux, bad, form = ("isn't", "aren't", verb.ing) if m.agr == "3sg" \
            else ("aren't", "isn't", verb.ing)
    return m.words + [aux, form] + complement(rng, verb), len(m.words), bad, "."


def pair_question(rng):
    """Does the dog run? / Do the dog run?"""
    m, verb = _plain_subject(rng), draw(rng, ALL_VERBS)
    singular = m.agr == "3sg"
    if rng.random() < 0.6:
        aux, bad, form = ("does", "do", verb.base) if singular else ("do", "does", verb.base)
    else:
        aux, bad, form = ("is", "are", verb.ing) if singular else ("are", "is", verb.ing)
    return [aux] + m.words + [form] + complement(rng, verb), 0, bad, "?"


def pair_anaphor_number(rng):
    """The boys saw themselves. / The boys saw himself."""
    plural = rng.random() < 0.5
    m = _np_subject(rng, plural) if rng.random() < 0.75 or plural else name_mention(rng)
    verb = draw(rng, REFLEXIVE_VERBS)
    bad = "themselves" if not plural else REFLEXIVE[("3sg", m.gender)]
    return m.words + [verb.past, reflexive(m)], len(m.words) + 1, bad, "."


# UID -> (maker, field, linguistics_term), as in BLiMP's jsonl.
PHENOMENA: dict[str, tuple[Callable, str, str]] = {
    "subject_verb_agreement": (pair_subject_verb, "morphology", "subject_verb_agreement"),
    "agreement_across_pp": (pair_across_pp, "morphology", "subject_verb_agreement"),
    "agreement_across_relative_clause": (pair_across_relative_clause, "morphology",
                                         "subject_verb_agreement"),
    "agreement_coordinated_subject": (pair_coordinated_subject, "morphology",
                                      "subject_verb_agreement"),
    "copula_agreement": (pair_copula, "morphology", "subject_verb_agreement"),
    "determiner_noun_agreement": (pair_determiner_noun, "morphology", "determiner_noun_agreement"),
    "indefinite_article": (pair_indefinite_article, "morphology", "determiner_noun_agreement"),
    "negation_auxiliary": (pair_negation, "syntax", "negation"),
    "question_auxiliary": (pair_question, "syntax", "question_formation"),
    "anaphor_number_agreement": (pair_anaphor_number, "morphology", "anaphor_agreement"),
}


def minimal_pairs(uid: str, *, count: int, seed: int) -> list[dict]:
    """`count` distinct BLiMP-style pairs for one phenomenon; good and bad differ in one word."""
    make, field, term = PHENOMENA[uid]
    rng = random.Random(f"{seed}:pairs:{uid}")
    pairs, seen = [], set()
    for _ in range(count * 50):
        if len(pairs) == count:
            break
        words, at, bad_word, end = make(rng)
        good = sentence(words, end)
        if good in seen:
            continue
        seen.add(good)
        bad = sentence(words[:at] + [bad_word] + words[at + 1:], end)
        pairs.append({"sentence_good": good, "sentence_bad": bad, "field": field,
                      "linguistics_term": term, "UID": uid, "pair_id": len(pairs)})
    if len(pairs) < count:
        raise UserError(f"the demo grammar has only {len(pairs)} distinct {uid} pairs; "
                        f"ask for fewer than {count} per phenomenon")
    return pairs


def write_minimal_pairs(out_dir: Path | str, *, pairs_per_phenomenon: int, seed: int) -> dict:
    """Write `<UID>.jsonl` for every phenomenon in PHENOMENA; returns {"files": {name: count}}."""
    if pairs_per_phenomenon <= 0:
        raise UserError(f"pairs per phenomenon must be positive, got {pairs_per_phenomenon}")
    out_dir = Path(out_dir)
    make_folder(out_dir)
    files = {}
    for uid in PHENOMENA:
        pairs = minimal_pairs(uid, count=pairs_per_phenomenon, seed=seed)
        text = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
        write_atomic(out_dir / f"{uid}.jsonl", text)
        files[f"{uid}.jsonl"] = len(pairs)
    return {"files": files, "pairs": sum(files.values()), "seed": seed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write the built-in demo corpus (OUT_DIR/*.train) and its minimal pairs "
                    "(OUT_DIR/minimal_pairs/*.jsonl).")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--words", type=int, default=300_000, help="corpus size in words")
    parser.add_argument("--pairs", type=int, default=500, help="minimal pairs per phenomenon")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def body():
        corpus = write_corpus(args.out_dir, words=args.words, seed=args.seed)
        pairs = write_minimal_pairs(args.out_dir / "minimal_pairs",
                                    pairs_per_phenomenon=args.pairs, seed=args.seed)
        for name, info in corpus["files"].items():
            print(f"{args.out_dir / name}: {info['words']:,} words, {info['lines']:,} lines")
        print(f"{args.out_dir / 'minimal_pairs'}: {len(pairs['files'])} phenomena x "
              f"{args.pairs} pairs")

    exit_on_user_error(body)


if __name__ == "__main__":
    main()
