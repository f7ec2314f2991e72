"""A fixed set of general-purpose prompts for measuring what post-training leaves intact.

``lopt eval --task retention-kl`` (and ``drift``) let the *base* model answer each of these prompts
and then ask how far the tuned model has moved away from those answers. The prompts were written for
this project and are deliberately broad: facts, instructions, short stories, code, everyday
questions, a little arithmetic and reasoning. None of them resembles a math word problem in the
GSM8K style, so they probe the model's general behaviour rather than the skill being trained.

The list is part of the metric: changing it changes every retention number, so append new prompts
at the end (the order matters for ``--limit``) and never edit the existing ones.
"""
from __future__ import annotations

GENERAL_PROMPTS: tuple[str, ...] = (
    # --- facts and explanations
    "What is the capital of Australia, and why is it not Sydney?",
    "Explain in two sentences why the sky looks blue during the day.",
    "How many legs does a spider have?",
    "What does a thermometer measure?",
    "Name the largest planet in the solar system and one thing that makes it unusual.",
    "Why do we have seasons on Earth?",
    "What is photosynthesis? Keep the answer short.",
    "Who wrote the play Romeo and Juliet?",
    "What is the boiling point of water at sea level in degrees Celsius?",
    "Describe what a volcano is to a ten-year-old.",
    "What is the difference between weather and climate?",
    "Which ocean is the largest?",
    "What are the three states of matter you learn about in school?",
    "Explain what a vaccine does in the body.",
    "Why does ice float on water?",
    "What is the main job of the heart?",
    "What language is mainly spoken in Brazil?",
    "How does a rainbow form?",
    "What is a prime number? Give three examples.",
    "Briefly explain what the internet is.",
    # --- instructions and rewriting
    "Rewrite this sentence so it sounds more polite: Give me the report now.",
    "Summarize the idea of recycling in one sentence.",
    "List five fruits that are red.",
    "Translate 'good morning, how are you?' into French.",
    "Give me three tips for sleeping better.",
    "Write a short, friendly reminder that the team meeting moved to Thursday.",
    "Turn this list into a sentence: eggs, flour, sugar, butter.",
    "Correct the grammar: She don't like going to the store on mondays.",
    "Write a one-line slogan for a bicycle repair shop.",
    "Explain the rules of tic-tac-toe step by step.",
    "Make a packing list for a weekend camping trip.",
    "Suggest a name for a grey cat that likes to sleep in boxes.",
    "Write a polite email declining an invitation to a birthday party.",
    "Give two arguments for and two against school uniforms.",
    "Describe how to make a cup of tea, in numbered steps.",
    "Put these words in alphabetical order: pear, apple, mango, banana.",
    "Write a haiku about autumn leaves.",
    "Explain the word 'procrastinate' and use it in a sentence.",
    "Give me a simple weekly exercise plan for a beginner.",
    "Write three questions I could ask at the end of a job interview.",
    # --- stories and creative writing
    "Tell a very short story about a robot who learns to paint.",
    "Begin a mystery story with a single strong opening sentence.",
    "Write a short fable about a fox and a crow with a clear moral.",
    "Describe a quiet morning in a small fishing village.",
    "Invent a new holiday and describe how people celebrate it.",
    "Write a four-line poem about the sea.",
    "Tell a bedtime story about a dragon who is afraid of the dark.",
    "Describe an imaginary city that floats in the clouds.",
    "Write a dialogue of four lines between a teacher and a curious student.",
    "Continue this story: The old lighthouse had been dark for years, until one night",
    "Write a short diary entry from the point of view of a houseplant.",
    "Describe the taste of a lemon to someone who has never had one.",
    "Write a limerick about a forgetful wizard.",
    "Tell a short story that ends with the words 'and that is why we never eat soup on Tuesdays.'",
    "Describe a thunderstorm using all five senses.",
    # --- code
    "Write a Python function that returns the largest number in a list.",
    "What does the following Python code print? print(len('hello'))",
    "Explain what a for loop is, with a tiny example in Python.",
    "Write a JavaScript function that checks whether a string is a palindrome.",
    "What is the difference between a list and a tuple in Python?",
    "Write an SQL query that selects all rows from a table called users where age is over 30.",
    "Explain what a variable is in programming, in plain words.",
    "Write a Python function that counts the vowels in a string.",
    "What does HTML stand for, and what is it used for?",
    "Write a bash command that counts the lines in a file called notes.txt.",
    "Explain recursion using a simple example.",
    "Write a Python function to compute the factorial of n.",
    "What is a bug in software, and how do programmers find one?",
    "Write a short Python snippet that reads a text file and prints each line.",
    "Explain what JSON is and give a small example.",
    # --- everyday questions and advice
    "How can I keep bread fresh for longer?",
    "What should I do if I lock myself out of my house?",
    "How do I remove a coffee stain from a white shirt?",
    "What is a good way to start learning a new language?",
    "How much water should an adult drink in a day, roughly?",
    "What are some ways to save money on groceries?",
    "How do I politely ask a neighbour to turn down loud music?",
    "What should I bring to a job interview?",
    "How can I stay focused when working from home?",
    "What is a healthy breakfast I can make in five minutes?",
    "How often should I water a cactus?",
    "What are some fun things to do on a rainy day with children?",
    "How do I change a flat tyre on a bicycle?",
    "Why is it important to warm up before exercising?",
    "How can I make my passwords more secure?",
    # --- simple reasoning, numbers and comparisons
    "If a train leaves at 3 pm and the trip takes two and a half hours, when does it arrive?",
    "Which is heavier, a kilogram of feathers or a kilogram of stones?",
    "What comes next in the sequence 2, 4, 8, 16?",
    "Is a tomato a fruit or a vegetable? Explain briefly.",
    "Compare cats and dogs as pets in three short points.",
    "If today is Monday, what day will it be in ten days?",
    "How many minutes are there in three hours?",
    "Sort these animals by size from smallest to largest: elephant, mouse, horse, dog.",
    "What is the opposite of 'generous'?",
    "Explain why you should not look directly at the sun.",
    # --- opinions, history and culture
    "Why do people enjoy listening to music?",
    "What was the purpose of the Great Wall of China?",
    "Describe one invention that changed everyday life and explain how.",
    "What makes a good friend?",
    "Why are bees important for farming?",
)


def general_prompts(limit: int | None = None) -> list[str]:
    """The built-in prompts, the first ``limit`` of them when a limit is given."""
    prompts = list(GENERAL_PROMPTS)
    return prompts if limit is None else prompts[: max(0, limit)]
