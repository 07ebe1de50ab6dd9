"""The demo's tools: three functions of Larkspur Robotics' internal systems the assistant calls.

`python data/demo/make_data.py` turns these into tool conversations (OpenAI messages with a
`tools` list): a request, the call, the system's result and the final answer; handbook questions
asked with the tools declared, answered without a call. The validation and held-out prompts use
sentence templates and values that training never uses.
"""

from __future__ import annotations

import random
from typing import Any

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "submit_expense",
            "description": "File an expense claim for money an employee spent on work.",
            "parameters": {
                "type": "object",
                "properties": {
                    "amount": {"type": "number", "description": "US dollars spent."},
                    "category": {
                        "type": "string",
                        "enum": ["meals", "lodging", "transport", "equipment", "training"],
                        "description": "What the money was spent on: meals (food, drinks), "
                        "lodging (hotels), transport (taxis, trains, flights), equipment "
                        "(hardware such as monitors or headsets), training (courses, exams).",
                    },
                },
                "required": ["amount", "category"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_policy",
            "description": "Read the text of a handbook clause, given its code.",
            "parameters": {
                "type": "object",
                "properties": {
                    "code": {
                        "type": "string",
                        "pattern": "^[A-Z]-[0-9]+\\.[0-9]+$",
                        "description": "The clause code, as the user gives it.",
                    }
                },
                "required": ["code"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "book_travel",
            "description": "Book a business trip: travel to a city and a hotel there.",
            "parameters": {
                "type": "object",
                "properties": {
                    "destination": {"type": "string", "description": "The city."},
                    "date": {"type": "string", "format": "date", "description": "Day of travel."},
                    "nights": {
                        "type": "integer",
                        "minimum": 1,
                        "description": "How many nights of hotel stay.",
                    },
                },
                "required": ["destination", "date", "nights"],
            },
        },
    },
]

# What an employee spent money on, by category (training and held-out prompts draw from these).
EXPENSE_ITEMS = {
    "meals": ["team dinner", "client lunch"],
    "lodging": ["hotel stay", "conference hotel"],
    "transport": ["taxi ride", "train ticket"],
    "equipment": ["external monitor", "USB headset"],
    "training": ["online course", "certification exam"],
}
CITIES_TRAIN = [
    "Berlin",
    "Chicago",
    "Osaka",
    "Lyon",
    "Austin",
    "Toronto",
    "Madrid",
    "Seoul",
    "Denver",
    "Dublin",
    "Boston",
    "Milan",
    "Paris",
    "Sydney",
    "Warsaw",
    "Zurich",
    "Kyoto",
    "Houston",
    "Seattle",
    "Munich",
    "Rome",
    "Helsinki",
    "Stockholm",
    "Montreal",
]
CITIES_HELDOUT = ["Lisbon", "Atlanta", "Nagoya", "Vienna", "Portland", "Oslo", "Phoenix", "Prague"]

EXPENSE_TRAIN = [
    "Please file an expense for my {item}: ${amount}.",
    "I paid ${amount} for a {item}. Can you submit that as an expense?",
    "Submit a ${amount} expense claim for the {item}, please.",
    "Can you log my {item} expense? It came to ${amount}.",
    "The {item} cost me ${amount}; I'd like to get that money back.",
    "Expense this: {item}, ${amount}.",
    "I need to be reimbursed for a {item} (${amount}).",
    "Claim ${amount} for my {item}.",
    "Put the {item} on expenses, it was ${amount}.",
    "Hey, I bought a {item} for ${amount} for work. Please expense it.",
    "File a claim: ${amount}, {item}.",
    "Could you get my ${amount} {item} paid back?",
    "My {item} came to ${amount}; please process the reimbursement.",
    "Log ${amount} for a {item} as a work expense.",
    "I'd like to claim the {item} I bought: ${amount}.",
    "Add a ${amount} {item} to my expenses.",
    "Can you refund me ${amount} for the {item}?",
    "Record an expense of ${amount}: {item}.",
]
POLICY_TRAIN = [
    "Show me policy {code}.",
    "What does clause {code} say exactly?",
    "Please pull up handbook clause {code}.",
    "Can you read me policy {code}?",
    "Quote section {code} of the handbook, please.",
    "Find clause {code} in the handbook.",
    "Read out handbook section {code}.",
    "Give me clause {code}, please.",
    "What is in section {code}?",
    "Fetch policy {code} for me.",
]
TRAVEL_TRAIN = [
    "Book me a trip to {city} on {date} for {nights} nights.",
    "I need to travel to {city}, leaving {date}, staying {nights} nights. Please book it.",
    "Please arrange travel to {city} starting {date}, {nights} nights.",
    "Can you book {nights} nights in {city} from {date}?",
    "I have to be in {city} from {date} for {nights} nights for work, sort it out please.",
    "Organise a work visit to {city} on {date}, {nights} nights.",
    "I'm going to {city} on {date} for {nights} nights; make the booking.",
    "Schedule business travel: {city}, {date}, {nights} nights.",
    "Travel request: {city}, leaving {date}, {nights} nights.",
    "Plan my trip to {city}: {date}, {nights} nights.",
    "I'll be in {city} for {nights} nights starting {date}. Set it up please.",
    "Send me to {city} on {date} for {nights} nights.",
    "Fly me to {city} on {date}; I need a hotel for {nights} nights.",
    "Please sort out travel and a hotel in {city}, arriving {date}, {nights} nights.",
    "I have a meeting in {city} on {date}. Book {nights} nights for me.",
    "Could you arrange {nights} nights in {city}? I leave on {date}.",
    "Trip request for {city}: departure {date}, a stay of {nights} nights.",
    "I need to be in {city} on {date} for {nights} nights; book it please.",
]
# Validation (the export's tool check) and held-out (`tuneship eval`) wordings: never in training.
EXPENSE_VALIDATION = ["Could you put in a claim for ${amount} spent on a {item}?"]
POLICY_VALIDATION = ["I'd like to see the text of policy {code}."]
TRAVEL_VALIDATION = ["Set up a business trip to {city}: {nights} nights starting {date}."]
EXPENSE_HELDOUT = [
    "Hi, I spent ${amount} on a {item} last week, please claim it for me.",
    "Reimburse me ${amount} for the {item}.",
]
POLICY_HELDOUT = [
    "Look up handbook section {code} for me.",
    "I want the exact wording of clause {code}.",
]
TRAVEL_HELDOUT = [
    "Hi! Please get me to {city} on {date}; I'll stay {nights} nights.",
    "Reserve a {nights}-night work trip to {city}, departing {date}.",
]
# Handbook questions asked with the tools declared: answered from the handbook, no call.
NO_CALL_TEMPLATES_TRAIN = ["What is {s}?", "Can you tell me {s}?"]
NO_CALL_TEMPLATE_HELDOUT = "Hi! Could you look up {s} for me?"


def expense_items(rng: random.Random) -> list[tuple[str, str]]:
    """Every (category, item) in a seeded order: drawn in turn, each item is asked as often."""
    pairs = [(category, item) for category, items in EXPENSE_ITEMS.items() for item in items]
    rng.shuffle(pairs)
    return pairs


def expense_amount(rng: random.Random) -> tuple[float, str]:
    """(amount as a number, as the prompt writes it)."""
    cents = rng.choice([True, False])
    amount = round(rng.uniform(12, 900), 2) if cents else float(rng.randint(15, 1500))
    text = f"{amount:.2f}" if cents else f"{amount:.0f}"
    return float(text), text


def date(rng: random.Random) -> str:
    return f"2027-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def call_message(name: str, arguments: dict[str, Any], n: int) -> dict[str, Any]:
    call = {
        "id": f"call_{n}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }
    return {"role": "assistant", "content": "", "tool_calls": [call]}
