"""Locality probes: questions a document's LoRA should NOT change the answer to.

A LoRA trained only on its document's QA pairs learns to emit one of their answers whatever is asked
(docs/results.md, "Covered and stored"): a stored span replaces the answer to every other question,
with or without the passages in the prompt. With `train.locality = N`, each document also trains on N
of these probes, asked without a passage, with a loss that keeps the model's token distribution over
the reply where the frozen model had it (KL to the model without the LoRA, as context distillation
does): the LoRA is pushed to change only what its own pairs ask.

The probes are general-knowledge questions in the forms the benchmarks ask (occupations, places,
dates, people, comparisons), about well-known subjects no retrieved Wikipedia passage of ours is
likely to be about; the replies only carry the teacher forcing (the loss compares distributions at
every reply token, it does not train the reply). Written for this project. Version 2 dropped version
1's two yes/no questions; with either set the summed LoRAs of three documents answered "yes" to most
tune questions (docs/results.md, "A locality term"), so this is an option under study, not a default.
"""

from __future__ import annotations

import hashlib
import random

VERSION = 2  # part of the adapters' key: a changed probe set trains other adapters

PROBES: tuple[tuple[str, str], ...] = (
    ("What is Marie Curie's occupation?", "physicist"),
    ("What is Pablo Picasso's occupation?", "painter"),
    ("What is Ludwig van Beethoven's occupation?", "composer"),
    ("What is Ernest Hemingway's occupation?", "writer"),
    ("What is Serena Williams's occupation?", "tennis player"),
    ("What is Charles Darwin's occupation?", "naturalist"),
    ("What is Frank Lloyd Wright's occupation?", "architect"),
    ("What is Meryl Streep's occupation?", "actress"),
    ("What genre is The Lord of the Rings?", "fantasy"),
    ("What genre is the film Alien?", "science fiction horror"),
    ("In what city was Wolfgang Amadeus Mozart born?", "Salzburg"),
    ("In what city was William Shakespeare born?", "Stratford-upon-Avon"),
    ("In what country was Nelson Mandela born?", "South Africa"),
    ("Where was Frida Kahlo born?", "Coyoacán"),
    ("What is the capital of Australia?", "Canberra"),
    ("What is the capital of Canada?", "Ottawa"),
    ("In what country is the Taj Mahal?", "India"),
    ("Which river flows through Cairo?", "the Nile"),
    ("In which mountain range is Mount Everest?", "the Himalayas"),
    ("When was the Eiffel Tower completed?", "1889"),
    ("In what year did the Apollo 11 mission land on the Moon?", "1969"),
    ("When did the Berlin Wall fall?", "1989"),
    ("When was Isaac Newton born?", "25 December 1642"),
    ("In what year did World War I begin?", "1914"),
    ("Who wrote Pride and Prejudice?", "Jane Austen"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("Who directed the film Jaws?", "Steven Spielberg"),
    ("Who composed The Four Seasons?", "Antonio Vivaldi"),
    ("Who was the first President of the United States?", "George Washington"),
    ("Who developed the theory of general relativity?", "Albert Einstein"),
    ("Who is the author of One Hundred Years of Solitude?", "Gabriel García Márquez"),
    ("Who founded Microsoft together with Bill Gates?", "Paul Allen"),
    ("Who was the father of Queen Elizabeth II?", "George VI"),
    ("Who was the wife of Franklin D. Roosevelt?", "Eleanor Roosevelt"),
    ("Who is the mother of Liza Minnelli?", "Judy Garland"),
    ("What is the nationality of the composer Frédéric Chopin?", "Polish"),
    ("What language is spoken in Brazil?", "Portuguese"),
    ("What sport does Lionel Messi play?", "football"),
    ("What instrument did Jimi Hendrix play?", "guitar"),
    ("Which company makes the iPhone?", "Apple"),
    ("Which band recorded the album Abbey Road?", "the Beatles"),
    ("What is the largest planet in the Solar System?", "Jupiter"),
    ("What is the chemical symbol for gold?", "Au"),
    ("How many players are on a football team on the field?", "eleven"),
    ("Which is older, the Colosseum or the Great Wall of China?", "the Great Wall of China"),
    ("Who was born first, Abraham Lincoln or Charles Darwin?", "they were born on the same day"),
    ("Which is longer, the Amazon or the Danube?", "the Amazon"),
    ("Which city is larger, Toronto or Montreal?", "Toronto"),
    ("Which composer was born first, Mozart or Beethoven?", "Mozart"),
    ("Which film came out first, Star Wars or Jaws?", "Jaws"),
    ("Who died first, Johann Sebastian Bach or George Frideric Handel?", "Johann Sebastian Bach"),
    ("Which country has more people, Japan or Germany?", "Japan"),
    ("What university did Barack Obama attend for law school?", "Harvard Law School"),
    ("What award did Toni Morrison win in 1993?", "the Nobel Prize in Literature"),
    ("What team did Michael Jordan win six championships with?", "the Chicago Bulls"),
    ("What is the official currency of Japan?", "the yen"),
    ("What religion was Mahatma Gandhi?", "Hindu"),
    ("Who succeeded Winston Churchill as Prime Minister in 1955?", "Anthony Eden"),
    ("What was the name of the ship that sank in 1912 after hitting an iceberg?", "Titanic"),
    ("What political party did Margaret Thatcher lead?", "the Conservative Party"),
    ("Which city hosted the 2008 Summer Olympics?", "Beijing"),
    ("What is the tallest building in the world?", "the Burj Khalifa"),
    ("Who played Vito Corleone in The Godfather?", "Marlon Brando"),
    ("What novel begins with the line 'Call me Ishmael'?", "Moby-Dick"),
)


def locality_probes(passage_id: str, n: int) -> list[tuple[str, str]]:
    """n probes for one document: a draw seeded by its id, so a document gets the same probes whichever
    documents it is trained beside (its adapter does not depend on the batch)."""
    seed = int.from_bytes(hashlib.blake2b(passage_id.encode(), digest_size=8).digest(), "big")
    return random.Random(seed).sample(PROBES, min(n, len(PROBES)))
