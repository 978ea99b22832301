"""FLAN instruction templates: ten (inputs, targets) patterns per dataset, written for moetx.

A pattern is a `str.format` string over the fields of a *normalized record* (`FIELDS[name]`):
every dataset's record has its text fields plus `answer` (the target string), and
classification datasets also carry `options` (the class names, or per-example choices for
COPA), rendered where a pattern says `{options_}` as

    OPTIONS:
    - option 1
    - option 2

(`format_options`, FLAN's `OPTIONS:\\n- ` format). Patterns whose target is not `{answer}` are
"inverted" as in FLAN: they ask for the input text given the label (e.g. "Write a quote about
{answer}." -> "{text}"); zero-shot evaluation by rank classification uses only the
non-inverted patterns that list the options (`scoring_templates`).

The three-way NLI datasets read from TFDS (ANLI, MNLI, SNLI, CB) share one pattern family, as
the FLAN originals do; every other dataset has its own ten. Formatting exists twice, in Python
(`format_example`, for few-shot exemplars and tests) and in TensorFlow (`tf_format`, inside the
SeqIO pipelines); both are built from the same parsed pattern and must agree.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence

__all__ = [
    "FIELDS",
    "NLI3_OPTIONS",
    "OPTIONS_PLACEHOLDER",
    "PATTERNS",
    "format_example",
    "format_options",
    "is_inverted",
    "placeholders",
    "scoring_templates",
    "tf_format",
]

OPTIONS_PLACEHOLDER = "options_"
NLI3_OPTIONS = ("yes", "it is not possible to tell", "no")

# Fields of each dataset's normalized record ('options' is implied by `{options_}`).
FIELDS: dict[str, tuple[str, ...]] = {
    # offline (moetx.datasets.flan_sources)
    "fortunes_topic": ("text", "answer"),
    "language_id": ("text", "answer"),
    "spam": ("text", "answer"),
    "sotu_party": ("text", "answer"),
    "wordnet_nli": ("premise", "hypothesis", "answer"),
    "wordnet_define": ("definition", "pos", "word", "answer"),
    "wordnet_antonyms": ("word", "antonym", "answer"),
    "analogies": ("a", "b", "c", "d", "relation", "answer"),
    "trivia_qa": ("question", "category", "answer"),
    # TFDS
    "rte": ("premise", "hypothesis", "answer"),
    "anli": ("premise", "hypothesis", "answer"),
    "mnli": ("premise", "hypothesis", "answer"),
    "snli": ("premise", "hypothesis", "answer"),
    "cb": ("premise", "hypothesis", "answer"),
    "wnli": ("sentence1", "sentence2", "answer"),
    "qnli": ("question", "sentence", "answer"),
    "boolq": ("passage", "question", "answer"),
    "copa": ("premise", "question", "connector", "answer"),
    "sst2": ("sentence", "answer"),
    "imdb": ("text", "answer"),
    "yelp": ("text", "answer"),
    "ag_news": ("title", "text", "answer"),
    "trec": ("question", "answer"),
    "mrpc": ("sentence1", "sentence2", "answer"),
    "qqp": ("question1", "question2", "answer"),
    "cola": ("sentence", "answer"),
}

_NLI3 = [
    ("Premise: {premise}\nHypothesis: {hypothesis}\n\nDoes the premise entail the hypothesis?"
     "\n\n{options_}", "{answer}"),
    ("{premise}\n\nBased on the paragraph above, can we conclude that \"{hypothesis}\"?\n\n"
     "{options_}", "{answer}"),
    ("Read the text and decide whether the sentence below is true.\n\n{premise}\n\nSentence: "
     "{hypothesis}\n\n{options_}", "{answer}"),
    ("If \"{premise}\", does it follow that \"{hypothesis}\"?\n\n{options_}", "{answer}"),
    ("{premise}\n\nQuestion: does this mean that \"{hypothesis}\"?\n\n{options_}", "{answer}"),
    ("Take the following as truth: {premise}\nThen the statement \"{hypothesis}\" is true, "
     "false, or undetermined?\n\n{options_}", "{answer}"),
    ("Given the statement \"{premise}\", is \"{hypothesis}\" also true?\n\n{options_}",
     "{answer}"),
    ("{premise}\nCan we infer the following?\n{hypothesis}\n\n{options_}", "{answer}"),
    ("Context: {premise}\n\nClaim: {hypothesis}\n\nIs the claim supported by the context?\n\n"
     "{options_}", "{answer}"),
    ("Determine if the hypothesis follows from the premise.\n\nPremise: {premise}\n"
     "Hypothesis: {hypothesis}\n\n{options_}", "{answer}"),
]

PATTERNS: dict[str, list[tuple[str, str]]] = {
    "fortunes_topic": [
        ("What is this quote about?\n\n{text}\n\n{options_}", "{answer}"),
        ("{text}\n\nWhich topic does this fortune-cookie quote belong to?\n\n{options_}",
         "{answer}"),
        ("Quote: {text}\n\nTopic:\n\n{options_}", "{answer}"),
        ("Classify the topic of the following saying.\n\n{text}\n\n{options_}", "{answer}"),
        ("Here is a quotation: \"{text}\"\nWhat subject is it mainly about?\n\n{options_}",
         "{answer}"),
        ("Pick the best category for this quip.\n{text}\n\n{options_}", "{answer}"),
        ("{text}\n\nThis quote is about", "{answer}"),
        ("In which section of a quotation book would you file this?\n\n{text}\n\n{options_}",
         "{answer}"),
        ("Write a witty quote about {answer}.", "{text}"),
        ("Give me a fortune-cookie saying on the topic of {answer}.", "{text}"),
    ],
    "language_id": [
        ("Which language is this text written in?\n\n{text}\n\n{options_}", "{answer}"),
        ("{text}\n\nWhat language is this?\n\n{options_}", "{answer}"),
        ("Identify the language of the following quote.\n\n{text}\n\n{options_}", "{answer}"),
        ("Text: {text}\nLanguage:\n\n{options_}", "{answer}"),
        ("Someone sent me this: \"{text}\" In what language did they write?\n\n{options_}",
         "{answer}"),
        ("Detect the language.\n{text}\n\n{options_}", "{answer}"),
        ("{text}\n\nThe sentence above is written in", "{answer}"),
        ("Tell me which language this saying is in: {text}\n\n{options_}", "{answer}"),
        ("Write a short saying in {answer}.", "{text}"),
        ("Give an example of a quote written in {answer}.", "{text}"),
    ],
    "spam": [
        ("Is this email spam?\n\n{text}\n\n{options_}", "{answer}"),
        ("{text}\n\nShould a spam filter flag the email above?\n\n{options_}", "{answer}"),
        ("Email: {text}\n\nLabel:\n\n{options_}", "{answer}"),
        ("Classify the following message as spam or not spam.\n\n{text}\n\n{options_}",
         "{answer}"),
        ("I got this message in my inbox: \"{text}\" Is it junk mail?\n\n{options_}",
         "{answer}"),
        ("Read the email and decide if it is unsolicited bulk mail.\n{text}\n\n{options_}",
         "{answer}"),
        ("{text}\n\nIs this message spam or a legitimate email?", "{answer}"),
        ("Decide whether this email belongs in the spam folder.\n\n{text}\n\n{options_}",
         "{answer}"),
        ("Write the beginning of an email that is {answer}.", "{text}"),
        ("Compose an email (subject and first lines) a spam filter would label \"{answer}\".",
         "{text}"),
    ],
    "sotu_party": [
        ("This passage is from a State of the Union address. Which party did the president "
         "belong to?\n\n{text}\n\n{options_}", "{answer}"),
        ("{text}\n\nWas this speech given by a Democratic or a Republican president?\n\n"
         "{options_}", "{answer}"),
        ("Passage: {text}\n\nParty of the speaker:\n\n{options_}", "{answer}"),
        ("Guess the political party of the president who said this.\n\n{text}\n\n{options_}",
         "{answer}"),
        ("A president told Congress: \"{text}\" What was the president's party?\n\n{options_}",
         "{answer}"),
        ("Classify this excerpt of an annual message to Congress by party.\n{text}\n\n"
         "{options_}", "{answer}"),
        ("{text}\n\nThe president who gave this address was a member of the party:",
         "{answer}"),
        ("Read the speech excerpt and name the party of its author.\n\n{text}\n\n{options_}",
         "{answer}"),
        ("Write a passage of a State of the Union address by a {answer} president.", "{text}"),
        ("Draft four sentences a {answer} president might say to Congress.", "{text}"),
    ],
    "wordnet_nli": [
        ("Premise: {premise}\nHypothesis: {hypothesis}\n\nIf the premise is true, is the "
         "hypothesis true?\n\n{options_}", "{answer}"),
        ("{premise}\n\nDoes it follow that \"{hypothesis}\"?\n\n{options_}", "{answer}"),
        ("Sentence 1: {premise}\nSentence 2: {hypothesis}\n\nDoes sentence 1 entail sentence "
         "2?\n\n{options_}", "{answer}"),
        ("If we know that \"{premise}\", can we say that \"{hypothesis}\"?\n\n{options_}",
         "{answer}"),
        ("{premise}\nQuestion: {hypothesis} True, false, or unknown?\n\n{options_}",
         "{answer}"),
        ("Assume the following is true: {premise}\nIs this then also true: {hypothesis}\n\n"
         "{options_}", "{answer}"),
        ("Given that {premise} Is it true that {hypothesis}\n\n{options_}", "{answer}"),
        ("Read the first sentence and judge the second.\n{premise}\n{hypothesis}\n\n"
         "{options_}", "{answer}"),
        ("Statement: {premise}\nConclusion: {hypothesis}\n\nIs the conclusion valid?\n\n"
         "{options_}", "{answer}"),
        ("{premise} Does that imply: {hypothesis}?", "{answer}"),
    ],
    "wordnet_define": [
        ("What {pos} means \"{definition}\"?", "{answer}"),
        ("Give the word for this definition: {definition}", "{answer}"),
        ("Definition: {definition}\nPart of speech: {pos}\nWord:", "{answer}"),
        ("Which English {pos} is defined as \"{definition}\"?", "{answer}"),
        ("I am thinking of a {pos} that means {definition}. What is it?", "{answer}"),
        ("Name the {pos}: {definition}", "{answer}"),
        ("Dictionary entry: ___ ({pos}): {definition}\n\nFill in the blank.", "{answer}"),
        ("What word matches the following meaning?\n\n{definition}", "{answer}"),
        ("Define the {pos} \"{word}\".", "{definition}"),
        ("What does \"{word}\" mean?", "{definition}"),
    ],
    "wordnet_antonyms": [
        ("What is the opposite of \"{word}\"?", "{answer}"),
        ("Give an antonym of {word}.", "{answer}"),
        ("Word: {word}\nAntonym:", "{answer}"),
        ("Which word means the opposite of \"{word}\"?", "{answer}"),
        ("Name a word with the opposite meaning to {word}.", "{answer}"),
        ("The opposite of {word} is", "{answer}"),
        ("Find the antonym.\n\n{word}", "{answer}"),
        ("{word} is to its opposite as night is to day. What is the opposite of {word}?",
         "{answer}"),
        ("Give a word whose opposite is \"{antonym}\".", "{word}"),
        ("\"{antonym}\" is the antonym of which word?", "{word}"),
    ],
    "analogies": [
        ("{a} is to {b} as {c} is to what?", "{answer}"),
        ("Complete the analogy: {a} : {b} :: {c} : ?", "{answer}"),
        ("If {a} goes with {b}, what goes with {c}?", "{answer}"),
        ("Analogy ({relation}): {a} -> {b}, {c} ->", "{answer}"),
        ("Fill in the blank: {a} is to {b} as {c} is to ___.", "{answer}"),
        ("{a} relates to {b} in the same way that {c} relates to which word?", "{answer}"),
        ("Solve the word analogy.\n\n{a} : {b}\n{c} : ?", "{answer}"),
        ("Here is a {relation} analogy. {a} is to {b} as {c} is to", "{answer}"),
        ("{c} is to {answer} as {a} is to what?", "{b}"),
        ("Complete the analogy: {b} : {a} :: {answer} : ?", "{c}"),
    ],
    "trivia_qa": [
        ("{question}", "{answer}"),
        ("Answer the following trivia question.\n\n{question}", "{answer}"),
        ("Question: {question}\nAnswer:", "{answer}"),
        ("Quiz time! {question}", "{answer}"),
        ("Here is a question about {category}: {question}", "{answer}"),
        ("Please answer this: {question}", "{answer}"),
        ("Q: {question}\nA:", "{answer}"),
        ("Try to answer this general-knowledge question: {question}", "{answer}"),
        ("Write a trivia question whose answer is \"{answer}\".", "{question}"),
        ("Come up with a quiz question about {category} with the answer {answer}.",
         "{question}"),
    ],
    "rte": [
        ("{premise}\n\nBased on the paragraph above, can we conclude that \"{hypothesis}\"?"
         "\n\n{options_}", "{answer}"),
        ("Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail the "
         "hypothesis?\n\n{options_}", "{answer}"),
        ("{premise}\n\nQuestion with options: can we draw the conclusion that "
         "\"{hypothesis}\"?\n\n{options_}", "{answer}"),
        ("Read the text and determine if the sentence is true.\n\n{premise}\n\nSentence: "
         "{hypothesis}\n\n{options_}", "{answer}"),
        ("Is the sentence \"{hypothesis}\" true, given this passage?\n\n{premise}\n\n"
         "{options_}", "{answer}"),
        ("{premise}\nDoes this imply that \"{hypothesis}\"?\n\n{options_}", "{answer}"),
        ("Given the text \"{premise}\", is it guaranteed that \"{hypothesis}\"?\n\n{options_}",
         "{answer}"),
        ("Passage: {premise}\n\nCan it be inferred that {hypothesis}\n\n{options_}",
         "{answer}"),
        ("{premise}\n\nIs \"{hypothesis}\" a valid conclusion?\n\n{options_}", "{answer}"),
        ("Text: {premise}\nStatement: {hypothesis}\nIs the statement entailed by the text?\n\n"
         "{options_}", "{answer}"),
    ],
    "anli": _NLI3,
    "mnli": _NLI3,
    "snli": _NLI3,
    "cb": _NLI3,
    "wnli": [
        ("Sentence 1: \"{sentence1}\"\nSentence 2: \"{sentence2}\"\nIs sentence 2 true, "
         "given sentence 1?\n\n{options_}", "{answer}"),
        ("{sentence1}\n\nDoes this mean that \"{sentence2}\"?\n\n{options_}", "{answer}"),
        ("If \"{sentence1}\", can we conclude that \"{sentence2}\"?\n\n{options_}",
         "{answer}"),
        ("Read this: {sentence1}\nNow, is it true that {sentence2}\n\n{options_}",
         "{answer}"),
        ("Does \"{sentence2}\" follow from \"{sentence1}\"?\n\n{options_}", "{answer}"),
        ("{sentence1}\nQuestion: {sentence2} Yes or no?\n\n{options_}", "{answer}"),
        ("Resolve the pronoun and decide: {sentence1}\nTherefore, {sentence2}\n\n{options_}",
         "{answer}"),
        ("Text: {sentence1}\nClaim: {sentence2}\nIs the claim correct?\n\n{options_}",
         "{answer}"),
        ("Assuming \"{sentence1}\" is true, is \"{sentence2}\" true?\n\n{options_}",
         "{answer}"),
        ("{sentence1} Based on that, {sentence2} Correct?\n\n{options_}", "{answer}"),
    ],
    "qnli": [
        ("Does the sentence \"{sentence}\" answer the question \"{question}\"?\n\n{options_}",
         "{answer}"),
        ("Question: {question}\nSentence: {sentence}\nDoes the sentence contain the answer?\n\n"
         "{options_}", "{answer}"),
        ("{question}\n\nIs \"{sentence}\" a good answer to this question?\n\n{options_}",
         "{answer}"),
        ("Can the question \"{question}\" be answered from this sentence?\n{sentence}\n\n"
         "{options_}", "{answer}"),
        ("{sentence}\n\nDoes the text above answer: {question}\n\n{options_}", "{answer}"),
        ("Q: {question}\nA: {sentence}\nDoes the answer respond to the question?\n\n"
         "{options_}", "{answer}"),
        ("Is the answer to \"{question}\" found in \"{sentence}\"?\n\n{options_}", "{answer}"),
        ("Decide whether the passage answers the question.\nQuestion: {question}\nPassage: "
         "{sentence}\n\n{options_}", "{answer}"),
        ("{question} Does \"{sentence}\" answer it?\n\n{options_}", "{answer}"),
        ("Here is a question and a sentence. Question: {question} Sentence: {sentence} Does "
         "the sentence answer the question?\n\n{options_}", "{answer}"),
    ],
    "boolq": [
        ("{passage}\n\nCan we conclude that {question}?\n\n{options_}", "{answer}"),
        ("{passage}\n\nIs it true that {question}?\n\n{options_}", "{answer}"),
        ("Passage: {passage}\n\nQuestion: {question}?\n\n{options_}", "{answer}"),
        ("Read the text and answer the question.\n\n{passage}\n\n{question}?\n\n{options_}",
         "{answer}"),
        ("Based on the following text, {question}?\n\n{passage}\n\n{options_}", "{answer}"),
        ("{passage}\n\nAnswer yes or no: {question}?\n\n{options_}", "{answer}"),
        ("Text: {passage}\n\nDoes the text say that {question}?\n\n{options_}", "{answer}"),
        ("{passage}\nQ: {question}?\n\n{options_}", "{answer}"),
        ("Answer the question from the passage: {question}?\n\n{passage}\n\n{options_}",
         "{answer}"),
        ("{passage}\n\nAfter reading this, {question}?\n\n{options_}", "{answer}"),
    ],
    "copa": [
        ("{premise} What is the {question}?\n\n{options_}", "{answer}"),
        ("Here is a premise: \"{premise}\"\n\nWhat is the {question}?\n\n{options_}",
         "{answer}"),
        ("{premise} Which is the more plausible {question}?\n\n{options_}", "{answer}"),
        ("Premise: {premise}\nWhat is the {question} of this?\n\n{options_}", "{answer}"),
        ("Complete the sentence: {premise} {connector}...\n\n{options_}", "{answer}"),
        ("\"{premise}\" Choose the correct {question}.\n\n{options_}", "{answer}"),
        ("Pick the more likely continuation: {premise} {connector}\n\n{options_}", "{answer}"),
        ("{premise}\n\nWhich option is the {question}?\n\n{options_}", "{answer}"),
        ("Given \"{premise}\", what is the most plausible {question}?\n\n{options_}",
         "{answer}"),
        ("Write a sentence that describes the {question} of: {premise}", "{answer}"),
    ],
    "sst2": [
        ("Review: \"{sentence}\"\nIs this movie review sentence negative or positive?\n\n"
         "{options_}", "{answer}"),
        ("Short movie review: {sentence}\nDid the critic think positively or negatively of "
         "the movie?\n\n{options_}", "{answer}"),
        ("Sentence from a movie review: {sentence}\nWas the movie seen positively or "
         "negatively?\n\n{options_}", "{answer}"),
        ("\"{sentence}\"\nHow would the sentiment of this sentence be perceived?\n\n"
         "{options_}", "{answer}"),
        ("Is the sentiment of the following sentence positive or negative?\n{sentence}\n\n"
         "{options_}", "{answer}"),
        ("What is the sentiment of this review?\n{sentence}\n\n{options_}", "{answer}"),
        ("{sentence}\n\nThe reviewer's opinion of the film is", "{answer}"),
        ("Classify the sentiment: {sentence}\n\n{options_}", "{answer}"),
        ("Write a {answer} movie review sentence.", "{sentence}"),
        ("Generate a short {answer} sentence about a film.", "{sentence}"),
    ],
    "imdb": [
        ("{text}\nDid this review think positively or negatively of the movie?\n\n{options_}",
         "{answer}"),
        ("{text}\nWhat is the sentiment of this review?\n\n{options_}", "{answer}"),
        ("Review: {text}\n\nIs this review positive or negative?\n\n{options_}", "{answer}"),
        ("How would you describe the sentiment of this movie review?\n{text}\n\n{options_}",
         "{answer}"),
        ("{text}\n\nWould you say the reviewer liked the film?\n\n{options_}", "{answer}"),
        ("Determine the sentiment:\n\n{text}\n\n{options_}", "{answer}"),
        ("{text}\n\nOverall, this review is", "{answer}"),
        ("Read the IMDb review and label its sentiment.\n{text}\n\n{options_}", "{answer}"),
        ("Write a {answer} movie review.", "{text}"),
        ("Generate a {answer} review of a film you watched.", "{text}"),
    ],
    "yelp": [
        ("{text}\nIs this review positive or negative?\n\n{options_}", "{answer}"),
        ("What is the sentiment of the following review?\n{text}\n\n{options_}", "{answer}"),
        ("Yelp review: {text}\n\nHow does the customer feel?\n\n{options_}", "{answer}"),
        ("{text}\n\nDid the reviewer enjoy the business?\n\n{options_}", "{answer}"),
        ("Classify this business review.\n{text}\n\n{options_}", "{answer}"),
        ("Review: {text}\nSentiment:\n\n{options_}", "{answer}"),
        ("{text}\n\nThe tone of this review is", "{answer}"),
        ("How would you rate the sentiment of this restaurant or shop review?\n{text}\n\n"
         "{options_}", "{answer}"),
        ("Write a {answer} Yelp review.", "{text}"),
        ("Generate a {answer} review for a place you visited.", "{text}"),
    ],
    "ag_news": [
        ("{title}\n\n{text}\n\nWhat is this text about?\n\n{options_}", "{answer}"),
        ("{title}\n\n{text}\n\nWhich topic is this article about?\n\n{options_}", "{answer}"),
        ("{text}\nWhich is the best summary of this article?\n\n{options_}", "{answer}"),
        ("Select the topic that this news item is about:\n\n{text}\n\n{options_}", "{answer}"),
        ("Headline: {title}\nArticle: {text}\nSection:\n\n{options_}", "{answer}"),
        ("Classify the news story.\n{title}. {text}\n\n{options_}", "{answer}"),
        ("{title}: {text}\n\nThis story belongs in the section", "{answer}"),
        ("In which section of the newspaper would this appear?\n{title}\n{text}\n\n"
         "{options_}", "{answer}"),
        ("Write a title for this article:\n\n{text}", "{title}"),
        ("Write a short {answer} news article with the headline \"{title}\".", "{text}"),
    ],
    "trec": [
        ("What type of thing is the question \"{question}\" asking about?\n\n{options_}",
         "{answer}"),
        ("Is the question \"{question}\" asking about an entity, a description, an "
         "abbreviation, a person, a location, or a number?\n\n{options_}", "{answer}"),
        ("Question: {question}\n\nWhat kind of answer does it expect?\n\n{options_}",
         "{answer}"),
        ("Classify the answer type of this question: {question}\n\n{options_}", "{answer}"),
        ("{question}\n\nWhich category best describes the answer to this question?\n\n"
         "{options_}", "{answer}"),
        ("What is the expected answer type?\n{question}\n\n{options_}", "{answer}"),
        ("Would the answer to \"{question}\" be a person, place, number, thing, description "
         "or abbreviation?\n\n{options_}", "{answer}"),
        ("{question} The answer to this is a", "{answer}"),
        ("Categorize the question by the kind of answer: {question}\n\n{options_}",
         "{answer}"),
        ("Write a question whose answer is of type: {answer}.", "{question}"),
    ],
    "mrpc": [
        ("Here are two sentences:\n{sentence1}\n{sentence2}\nDo they have the same meaning?"
         "\n\n{options_}", "{answer}"),
        ("\"{sentence1}\"\n\"{sentence2}\"\nAre these two sentences paraphrases?\n\n"
         "{options_}", "{answer}"),
        ("Sentence 1: {sentence1}\nSentence 2: {sentence2}\nDo they mean the same thing?\n\n"
         "{options_}", "{answer}"),
        ("Do the following sentences say the same thing?\n\n{sentence1}\n{sentence2}\n\n"
         "{options_}", "{answer}"),
        ("Is \"{sentence2}\" a paraphrase of \"{sentence1}\"?\n\n{options_}", "{answer}"),
        ("{sentence1}\n{sentence2}\nIs the second sentence a rewording of the first?\n\n"
         "{options_}", "{answer}"),
        ("Are these two news sentences semantically equivalent?\nA: {sentence1}\nB: "
         "{sentence2}\n\n{options_}", "{answer}"),
        ("Compare: \"{sentence1}\" and \"{sentence2}\". Same meaning?\n\n{options_}",
         "{answer}"),
        ("Check whether the two sentences convey the same information.\n{sentence1}\n"
         "{sentence2}\n\n{options_}", "{answer}"),
        ("{sentence1}\n\nRewrite this sentence so that it keeps its meaning.", "{sentence2}"),
    ],
    "qqp": [
        ("{question1}\n{question2}\nWould you say that these questions are the same?\n\n"
         "{options_}", "{answer}"),
        ("First question: {question1}\nSecond question: {question2}\nAre these two questions "
         "asking the same thing?\n\n{options_}", "{answer}"),
        ("Question 1: {question1}\nQuestion 2: {question2}\nAre questions 1 and 2 asking the "
         "same thing?\n\n{options_}", "{answer}"),
        ("Are the following two questions duplicates?\n{question1}\n{question2}\n\n"
         "{options_}", "{answer}"),
        ("Do \"{question1}\" and \"{question2}\" have the same answer?\n\n{options_}",
         "{answer}"),
        ("{question1}\n\n{question2}\n\nPlease tell me if those questions are the same.\n\n"
         "{options_}", "{answer}"),
        ("Is \"{question2}\" a rephrasing of \"{question1}\"?\n\n{options_}", "{answer}"),
        ("Would merging these two forum questions be correct?\n1. {question1}\n2. "
         "{question2}\n\n{options_}", "{answer}"),
        ("Check if these questions are duplicates: {question1} / {question2}\n\n{options_}",
         "{answer}"),
        ("Write a question that asks the same thing as: {question1}", "{question2}"),
    ],
    "cola": [
        ("Sentence: \"{sentence}\"\nWould a linguist rate this sentence to be acceptable "
         "linguistically?\n\n{options_}", "{answer}"),
        ("{sentence}\n\nIs this sentence grammatically acceptable?\n\n{options_}", "{answer}"),
        ("Is the following sentence linguistically acceptable?\n{sentence}\n\n{options_}",
         "{answer}"),
        ("Test sentence: \"{sentence}\"\nIs this test sentence a correct grammatical English "
         "sentence?\n\n{options_}", "{answer}"),
        ("Would a native speaker accept this sentence?\n\n{sentence}\n\n{options_}",
         "{answer}"),
        ("\"{sentence}\" Is that grammatical?\n\n{options_}", "{answer}"),
        ("Check the grammar: {sentence}\nAcceptable?\n\n{options_}", "{answer}"),
        ("How would you judge the grammaticality of this sentence?\n{sentence}\n\n{options_}",
         "{answer}"),
        ("Sentence: {sentence}\nGrammatical:\n\n{options_}", "{answer}"),
        ("{sentence}\n\nDoes this sentence follow the rules of English grammar?\n\n"
         "{options_}", "{answer}"),
    ],
}


def placeholders(pattern: str) -> list[str]:
    """Field names referenced by `pattern`, in order (`{options_}` included)."""
    return [field for _, field, _, _ in string.Formatter().parse(pattern) if field is not None]


def _pieces(pattern: str) -> list[tuple[str, str | None]]:
    """(literal, field or None) pieces of `pattern`; rejects format specs and conversions."""
    out = []
    for literal, field, spec, conversion in string.Formatter().parse(pattern):
        if spec or conversion:
            raise ValueError(f"Pattern {pattern!r} uses a format spec or conversion on "
                             f"{{{field}}}; expected plain {{field}} placeholders.")
        if field is not None and not field.isidentifier():
            raise ValueError(f"Pattern {pattern!r} has placeholder {{{field}}}; expected a "
                             "record field name.")
        out.append((literal, field))
    return out


def format_options(options: Sequence[str]) -> str:
    """FLAN's options block: 'OPTIONS:\\n- a\\n- b'."""
    return "OPTIONS:\n- " + "\n- ".join(options)


def is_inverted(template: tuple[str, str]) -> bool:
    """True when the target is not the answer (the pattern asks for an input field)."""
    return template[1] != "{answer}"


def scoring_templates(name: str) -> list[int]:
    """Indices of `name`'s templates usable for rank classification (answer target, options
    listed)."""
    return [i for i, t in enumerate(PATTERNS[name])
            if not is_inverted(t) and OPTIONS_PLACEHOLDER in placeholders(t[0])]


def _render(pattern: str, record: Mapping[str, str], options: Sequence[str] | None) -> str:
    parts = []
    for literal, field in _pieces(pattern):
        parts.append(literal)
        if field is None:
            continue
        if field == OPTIONS_PLACEHOLDER:
            if options is None:
                raise KeyError(f"Pattern {pattern!r} lists {{options_}} but the record has no "
                               "options.")
            parts.append(format_options(options))
        else:
            if field not in record:
                raise KeyError(f"Pattern {pattern!r} needs field {field!r}; the record has "
                               f"{sorted(record)}.")
            parts.append(str(record[field]))
    return "".join(parts)


def format_example(template: tuple[str, str], record: Mapping[str, str],
                   options: Sequence[str] | None = None) -> tuple[str, str]:
    """(inputs, targets) of `record` under `template` (Python; `options` fill {options_})."""
    if options is None and "options" in record:
        options = list(record["options"])
    return _render(template[0], record, options), _render(template[1], record, options)


def tf_format(pattern: str, features: Mapping):
    """The TensorFlow twin of `format_example` for one pattern: a tf.string scalar.

    `features` maps field names to tf.string scalars, plus 'options' (tf.string [k]) when the
    pattern lists `{options_}`.
    """
    import tensorflow as tf

    parts = []
    for literal, field in _pieces(pattern):
        if literal:
            parts.append(tf.constant(literal))
        if field == OPTIONS_PLACEHOLDER:
            parts.append(tf.constant("OPTIONS:\n- "))
            parts.append(tf.strings.reduce_join(features["options"], separator="\n- "))
        elif field is not None:
            parts.append(features[field])
    if not parts:
        return tf.constant("")
    return tf.strings.join(parts)
