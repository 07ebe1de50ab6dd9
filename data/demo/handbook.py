# ruff: noqa: E501  (one fact per entry reads better than wrapped strings)
"""The demo domain: the employee handbook of Larkspur Robotics, a fictional company.

Every fact is invented (amounts, limits, clause numbers), so the base model cannot know it.
`python data/demo/make_data.py` turns this table into the demo datasets.

Each fact: (policy code, subject, held-out subject, key fact, answer). The subject is the
wording training questions use; the held-out subject is a paraphrase used only in held-out
questions. The answer always contains the key fact and the policy code.
"""

from __future__ import annotations

COMPANY = "Larkspur Robotics"

# (code, subject, heldout_subject, key_fact, answer)
FACTS: list[tuple[str, str, str, str, str]] = [
    # Travel and expenses
    (
        "T-4.2",
        "the daily meal allowance for domestic business travel",
        "how much I can spend on food per day when travelling for work inside the country",
        "$62",
        "Under Policy T-4.2, the daily meal allowance for domestic business travel is $62.",
    ),
    (
        "T-4.3",
        "the daily meal allowance for international business travel",
        "the per-day food budget on a work trip abroad",
        "$95",
        "Under Policy T-4.3, the daily meal allowance for international business travel is $95.",
    ),
    (
        "T-2.1",
        "the maximum hotel rate per night in standard cities",
        "the nightly cap on lodging costs in an ordinary city",
        "$210",
        "Under Policy T-2.1, the maximum hotel rate in standard cities is $210 per night.",
    ),
    (
        "T-2.2",
        "the maximum hotel rate per night in high-cost cities",
        "the most the company pays for one night of lodging in an expensive city",
        "$340",
        "Under Policy T-2.2, the maximum hotel rate in high-cost cities is $340 per night.",
    ),
    (
        "T-3.1",
        "the flight duration above which business class is allowed",
        "how long a flight must be before I may book business class",
        "9 hours",
        "Under Policy T-3.1, business class is allowed on flights longer than 9 hours.",
    ),
    (
        "T-5.4",
        "the mileage reimbursement rate for a personal car",
        "the per-mile payment for driving my own vehicle on company business",
        "$0.58 per mile",
        "Under Policy T-5.4, driving a personal car is reimbursed at $0.58 per mile.",
    ),
    (
        "T-6.1",
        "the deadline for submitting an expense report",
        "how many days I have to file expenses after a trip",
        "30 days",
        "Under Policy T-6.1, expense reports must be submitted within 30 days of the trip.",
    ),
    (
        "T-6.3",
        "the amount above which an expense needs a receipt",
        "the spending threshold that requires me to keep a receipt",
        "$25",
        "Under Policy T-6.3, every expense above $25 needs an itemized receipt.",
    ),
    (
        "T-7.2",
        "the limit for client entertainment per guest",
        "how much I may spend per guest when hosting a customer dinner",
        "$120",
        "Under Policy T-7.2, client entertainment is limited to $120 per guest.",
    ),
    (
        "T-8.1",
        "the system used to book business travel",
        "the tool where work trips have to be reserved",
        "TripDesk",
        "Under Policy T-8.1, all business travel must be booked through TripDesk.",
    ),
    (
        "T-8.5",
        "the advance notice required for booking international trips",
        "how early an overseas trip has to be booked",
        "21 days",
        "Under Policy T-8.5, international trips must be booked at least 21 days in advance.",
    ),
    (
        "T-9.2",
        "the daily incidental allowance",
        "the per-day amount for tips and small travel costs",
        "$15",
        "Under Policy T-9.2, the daily incidental allowance is $15.",
    ),
    (
        "T-9.6",
        "the maximum reimbursement for a home internet upgrade",
        "the cap on repaying a faster home broadband plan",
        "$40 per month",
        "Under Policy T-9.6, a home internet upgrade is reimbursed up to $40 per month.",
    ),
    # Leave
    (
        "L-1.1",
        "the number of paid vacation days per year for new employees",
        "how much annual paid holiday someone gets in their first years",
        "22 days",
        "Under Policy L-1.1, new employees receive 22 days of paid vacation per year.",
    ),
    (
        "L-1.2",
        "the number of paid vacation days after five years of service",
        "the yearly vacation entitlement once I have been here five years",
        "27 days",
        "Under Policy L-1.2, employees with five years of service receive 27 days of paid vacation per year.",
    ),
    (
        "L-1.4",
        "the number of unused vacation days that carry over to the next year",
        "how many leftover holiday days I can roll into next year",
        "5 days",
        "Under Policy L-1.4, up to 5 days of unused vacation carry over to the next year.",
    ),
    (
        "L-2.1",
        "the number of paid sick days per year",
        "how many days of illness are paid each year",
        "12 days",
        "Under Policy L-2.1, employees have 12 days of paid sick leave per year.",
    ),
    (
        "L-2.3",
        "the number of consecutive sick days after which a doctor's note is required",
        "when a medical certificate becomes necessary for a sickness absence",
        "3 days",
        "Under Policy L-2.3, a doctor's note is required after 3 days of consecutive sick leave.",
    ),
    (
        "L-3.1",
        "the length of paid parental leave",
        "how long new parents can be off with full pay",
        "18 weeks",
        "Under Policy L-3.1, paid parental leave lasts 18 weeks.",
    ),
    (
        "L-3.5",
        "the paid leave for a family bereavement",
        "the days off granted when a close relative dies",
        "5 days",
        "Under Policy L-3.5, employees receive 5 days of paid bereavement leave.",
    ),
    (
        "L-4.2",
        "the paid volunteer leave per year",
        "the annual time off for charity work",
        "2 days",
        "Under Policy L-4.2, employees may take 2 days of paid volunteer leave per year.",
    ),
    (
        "L-4.6",
        "the length of a sabbatical after seven years of service",
        "the extended break offered to staff with seven years at the company",
        "6 weeks",
        "Under Policy L-4.6, employees with seven years of service may take a sabbatical of 6 weeks.",
    ),
    (
        "L-5.1",
        "the notice required before taking vacation",
        "how far ahead holiday requests must be filed",
        "14 days",
        "Under Policy L-5.1, vacation must be requested at least 14 days in advance.",
    ),
    (
        "L-5.3",
        "the system used to request leave",
        "the application where time off is entered",
        "LeaveLink",
        "Under Policy L-5.3, all leave is requested in LeaveLink.",
    ),
    (
        "L-6.2",
        "the paid leave for jury duty",
        "how long court service is paid",
        "10 days",
        "Under Policy L-6.2, jury duty is paid for up to 10 days.",
    ),
    # IT security
    (
        "S-1.1",
        "the minimum password length",
        "how many characters a password needs at least",
        "14 characters",
        "Under Policy S-1.1, passwords must be at least 14 characters long.",
    ),
    (
        "S-1.3",
        "how often passwords must be changed",
        "the password rotation period",
        "180 days",
        "Under Policy S-1.3, passwords must be changed every 180 days.",
    ),
    (
        "S-1.5",
        "the number of failed logins before an account locks",
        "how many wrong password attempts lock me out",
        "6 attempts",
        "Under Policy S-1.5, an account locks after 6 attempts with a wrong password.",
    ),
    (
        "S-2.1",
        "the idle time after which a laptop must lock",
        "how quickly an unattended computer has to lock its screen",
        "5 minutes",
        "Under Policy S-2.1, laptops must lock after 5 minutes of inactivity.",
    ),
    (
        "S-2.4",
        "the deadline for reporting a lost or stolen laptop",
        "how soon a missing company computer has to be reported",
        "2 hours",
        "Under Policy S-2.4, a lost or stolen laptop must be reported within 2 hours.",
    ),
    (
        "S-3.2",
        "the approved password manager",
        "which password vault employees must use",
        "KeyVaultPro",
        "Under Policy S-3.2, the approved password manager is KeyVaultPro.",
    ),
    (
        "S-3.4",
        "the address for reporting phishing emails",
        "where to forward a suspicious email",
        "phish@larkspur.example",
        "Under Policy S-3.4, phishing emails are reported to phish@larkspur.example.",
    ),
    (
        "S-4.1",
        "the required multi-factor authentication method",
        "the second login factor the company requires",
        "hardware security key",
        "Under Policy S-4.1, multi-factor authentication requires a hardware security key.",
    ),
    (
        "S-4.3",
        "the retention period for security logs",
        "how long audit logs are kept",
        "400 days",
        "Under Policy S-4.3, security logs are kept for 400 days.",
    ),
    (
        "S-5.2",
        "the classification level for customer data",
        "the label that customer records must carry",
        "Confidential-B",
        "Under Policy S-5.2, customer data is classified as Confidential-B.",
    ),
    (
        "S-5.5",
        "the maximum USB storage allowed",
        "the biggest removable drive I may plug in",
        "0 GB",
        "Under Policy S-5.5, no USB storage is allowed: the limit is 0 GB.",
    ),
    (
        "S-6.1",
        "the deadline for installing critical security patches",
        "how quickly urgent security updates must be applied",
        "72 hours",
        "Under Policy S-6.1, critical security patches must be installed within 72 hours.",
    ),
    # Purchasing
    (
        "P-1.1",
        "the purchase amount that needs a manager's approval",
        "the spending level where my manager has to sign off",
        "$500",
        "Under Policy P-1.1, purchases above $500 need a manager's approval.",
    ),
    (
        "P-1.2",
        "the purchase amount that needs a director's approval",
        "the spending level that requires a director to sign",
        "$5,000",
        "Under Policy P-1.2, purchases above $5,000 need a director's approval.",
    ),
    (
        "P-1.3",
        "the purchase amount that needs three competing quotes",
        "when I have to collect several bids from suppliers",
        "$10,000",
        "Under Policy P-1.3, purchases above $10,000 need three competing quotes.",
    ),
    (
        "P-2.1",
        "the limit of a corporate card single transaction",
        "the most one company card payment can be",
        "$2,500",
        "Under Policy P-2.1, a single corporate card transaction is limited to $2,500.",
    ),
    (
        "P-2.4",
        "the monthly limit of a corporate card",
        "the total a company card may spend in one month",
        "$8,000",
        "Under Policy P-2.4, a corporate card has a monthly limit of $8,000.",
    ),
    (
        "P-3.1",
        "the purchasing system",
        "the tool where purchase requests are raised",
        "BuyBridge",
        "Under Policy P-3.1, purchases are requested in BuyBridge.",
    ),
    (
        "P-3.3",
        "the standard payment terms for suppliers",
        "how many days suppliers wait to be paid",
        "net 45",
        "Under Policy P-3.3, suppliers are paid on net 45 terms.",
    ),
    (
        "P-4.2",
        "the maximum value of a gift an employee may accept",
        "the most valuable present I can take from a vendor",
        "$75",
        "Under Policy P-4.2, employees may accept gifts worth at most $75.",
    ),
    (
        "P-5.1",
        "the software approval board",
        "the group that must approve new software",
        "Tools Council",
        "Under Policy P-5.1, new software must be approved by the Tools Council.",
    ),
    # Remote work and facilities
    (
        "R-1.1",
        "the number of remote work days per week",
        "how many days a week I can work from home",
        "3 days",
        "Under Policy R-1.1, employees may work remotely up to 3 days per week.",
    ),
    (
        "R-1.4",
        "the one-time home office equipment stipend",
        "the single payment for setting up a home workspace",
        "$650",
        "Under Policy R-1.4, the one-time home office stipend is $650.",
    ),
    (
        "R-2.2",
        "the core hours when everyone must be reachable",
        "the time window in which staff must be online",
        "10:00 to 15:00",
        "Under Policy R-2.2, core hours are 10:00 to 15:00.",
    ),
    (
        "R-3.1",
        "the maximum time working from another country",
        "how long I can work remotely while abroad",
        "20 working days per year",
        "Under Policy R-3.1, working from another country is limited to 20 working days per year.",
    ),
    (
        "F-1.2",
        "the office badge replacement fee",
        "the cost of getting a new access card after losing mine",
        "$35",
        "Under Policy F-1.2, replacing an office badge costs $35.",
    ),
    (
        "F-2.1",
        "the notice needed to book the main conference hall",
        "how early the big meeting hall must be reserved",
        "48 hours",
        "Under Policy F-2.1, the main conference hall must be booked 48 hours ahead.",
    ),
    (
        "F-3.3",
        "the guest visiting hours",
        "when visitors are allowed in the building",
        "08:00 to 18:00",
        "Under Policy F-3.3, guests may visit from 08:00 to 18:00.",
    ),
    # Learning and conduct
    (
        "D-1.1",
        "the annual training budget per employee",
        "how much money each person gets for courses every year",
        "$1,800",
        "Under Policy D-1.1, each employee has an annual training budget of $1,800.",
    ),
    (
        "D-1.3",
        "the number of learning hours expected per year",
        "the yearly target for time spent on professional development",
        "40 hours",
        "Under Policy D-1.3, employees are expected to complete 40 hours of learning per year.",
    ),
    (
        "D-2.2",
        "the employee referral bonus",
        "the reward for recommending someone who gets hired",
        "$3,000",
        "Under Policy D-2.2, the employee referral bonus is $3,000.",
    ),
    (
        "H-1.4",
        "the ethics hotline number",
        "the phone line for reporting misconduct",
        "1-800-555-0147",
        "Under Policy H-1.4, the ethics hotline number is 1-800-555-0147.",
    ),
]

# Questions that use a fact's training subject; no held-out question appears in training.
TRAIN_TEMPLATES = [
    "What is {s}?",
    "According to the Larkspur Robotics handbook, what is {s}?",
    "Can you tell me {s}?",
    "I need to know {s}. What does the policy say?",
    "What does the employee handbook say about {s}?",
]
# Validation questions: two more wordings of each fact's subject, written without looking at a
# held-out wording, each asked once with VALIDATION_TEMPLATES in turn. Training measures its eval
# loss on them and keeps the best adapter, so the held-out questions stay untouched until
# `tuneship eval`. (Trained on instead, as augmentation, they halved the held-out loss but did not
# raise recall on paraphrased subjects (17% -> 19%) and cost general retention (91% -> 86%).)
VALIDATION_PARAPHRASES: dict[str, tuple[str, str]] = {
    "T-4.2": (
        "the per diem for meals on a business trip within the country",
        "how much the company covers for meals each day on a domestic work trip",
    ),
    "T-4.3": (
        "the per diem for meals on an international business trip",
        "how much the company covers for meals each day when travelling internationally",
    ),
    "T-2.1": (
        "the hotel limit per night in a normal city",
        "how much a hotel room may cost per night in standard cities",
    ),
    "T-2.2": (
        "the hotel limit per night in a high-cost city",
        "how much a hotel room may cost per night in high-cost cities",
    ),
    "T-3.1": (
        "when business class flights are permitted",
        "the minimum flight duration for flying business class",
    ),
    "T-5.4": (
        "the reimbursement per mile when I use my personal car",
        "how much I get back per mile for business driving in a private car",
    ),
    "T-6.1": (
        "how long I have to submit my expense report",
        "the time limit for handing in expense claims",
    ),
    "T-6.3": ("the expense amount that requires a receipt", "when I need a receipt for an expense"),
    "T-7.2": (
        "how much can be spent per guest on client entertainment",
        "the per-guest cap for entertaining clients",
    ),
    "T-8.1": (
        "the booking tool for business travel",
        "which system business trips have to be booked in",
    ),
    "T-8.5": (
        "how far in advance international travel must be booked",
        "the booking lead time for international trips",
    ),
    "T-9.2": (
        "the per-day allowance for incidental expenses",
        "how much I get each day for incidentals while travelling",
    ),
    "T-9.6": (
        "how much the company reimburses for upgrading my home internet",
        "the reimbursement limit for a home internet upgrade",
    ),
    "L-1.1": (
        "how many vacation days a new employee gets each year",
        "the annual paid vacation for new hires",
    ),
    "L-1.2": (
        "how many vacation days I get after five years of service",
        "the paid vacation per year after five years at the company",
    ),
    "L-1.4": (
        "how many unused vacation days carry over into the next year",
        "the vacation carry-over limit",
    ),
    "L-2.1": ("how many paid sick days I get each year", "the yearly paid sick leave"),
    "L-2.3": (
        "after how many sick days in a row I need a doctor's note",
        "when a doctor's note is required for sick leave",
    ),
    "L-3.1": ("how long paid parental leave lasts", "the duration of paid leave for new parents"),
    "L-3.5": (
        "how much paid bereavement leave I get",
        "the paid leave after a death in the family",
    ),
    "L-4.2": (
        "how much paid volunteering leave I get each year",
        "the yearly paid leave for volunteering",
    ),
    "L-4.6": (
        "how long the sabbatical is after seven years of service",
        "the sabbatical for employees with seven years of service",
    ),
    "L-5.1": (
        "how much notice I must give before taking vacation",
        "the advance notice for vacation requests",
    ),
    "L-5.3": ("where I request leave", "the system for submitting leave requests"),
    "L-6.2": ("how much paid leave I get for jury duty", "the paid leave for serving on a jury"),
    "S-1.1": ("how long a password must be", "the shortest password length allowed"),
    "S-1.3": ("how frequently I must change my password", "the password change interval"),
    "S-1.5": (
        "how many failed login attempts lock an account",
        "the account lockout threshold for failed logins",
    ),
    "S-2.1": (
        "how long a laptop can stay idle before it must lock",
        "the screen lock timeout for laptops",
    ),
    "S-2.4": (
        "how quickly a lost or stolen laptop must be reported",
        "the reporting deadline for a stolen laptop",
    ),
    "S-3.2": ("which password manager is approved", "the password manager employees must use"),
    "S-3.4": ("where to report phishing emails", "the email address for phishing reports"),
    "S-4.1": (
        "which multi-factor authentication method is required",
        "the multi-factor authentication employees must use",
    ),
    "S-4.3": ("how long security logs are retained", "the security log retention period"),
    "S-5.2": (
        "how customer data is classified",
        "the data classification for customer information",
    ),
    "S-5.5": ("the largest USB storage device allowed", "the USB storage size limit"),
    "S-6.1": (
        "how fast critical security patches must be installed",
        "the patching deadline for critical security updates",
    ),
    "P-1.1": (
        "when a purchase needs a manager's approval",
        "the manager approval threshold for purchases",
    ),
    "P-1.2": (
        "when a purchase needs a director's approval",
        "the director approval threshold for purchases",
    ),
    "P-1.3": (
        "when three competing quotes are required for a purchase",
        "the purchase value that requires three quotes",
    ),
    "P-2.1": (
        "the single transaction limit on a corporate card",
        "how much one corporate card transaction can be",
    ),
    "P-2.4": (
        "how much a corporate card can spend per month",
        "the corporate card's monthly spending limit",
    ),
    "P-3.1": ("which system is used for purchasing", "the system for purchase requests"),
    "P-3.3": ("the payment terms for suppliers", "how long the company takes to pay suppliers"),
    "P-4.2": ("the gift value limit for employees", "how valuable a gift an employee may accept"),
    "P-5.1": ("who approves new software", "the board that approves software"),
    "R-1.1": ("how many days per week I can work remotely", "the weekly remote work allowance"),
    "R-1.4": ("the stipend for home office equipment", "how much I get for home office equipment"),
    "R-2.2": ("the core hours", "when employees must be reachable during the day"),
    "R-3.1": (
        "how long I can work from another country",
        "the time limit for working remotely from another country",
    ),
    "F-1.2": (
        "how much it costs to replace an office badge",
        "the fee for a replacement office badge",
    ),
    "F-2.1": (
        "how much notice is needed to book the main conference hall",
        "the booking notice for the main conference hall",
    ),
    "F-3.3": ("the visiting hours for guests", "when guests may visit the office"),
    "D-1.1": (
        "the yearly training budget per employee",
        "how much training budget each employee gets per year",
    ),
    "D-1.3": ("how many learning hours are expected each year", "the annual learning hours target"),
    "D-2.2": ("the bonus for referring an employee", "how much the employee referral bonus is"),
    "H-1.4": (
        "the phone number of the ethics hotline",
        "the number to call for the ethics hotline",
    ),
}
VALIDATION_TEMPLATES = [
    "Can you tell me {s}?",
    "I need to know {s}. What does the policy say?",
    "What does the handbook say about {s}?",
]
# Held-out questions come in two styles: "reworded" asks about the training subject with a
# question form never used in training; "paraphrase" also words the subject differently (harder).
HELDOUT_REWORDED = "Hi! Could you look up {s} for me?"
HELDOUT_INDIRECT = "Could you remind me {s}?"  # held-out subjects that read as a question
HELDOUT_DIRECT = "What's {s} at Larkspur Robotics?"

# A few facts asked and answered in Chinese (the key fact stays the same string).
CHINESE_TRAIN = [
    ("T-4.2", "国内出差每天的餐费补贴是多少?", "根据政策 T-4.2,国内出差每日餐费补贴为 $62。"),
    (
        "T-4.2",
        "公司规定国内出差的每日伙食标准是多少?",
        "根据政策 T-4.2,国内出差每日餐费补贴为 $62。",
    ),
    ("L-1.1", "新员工每年有多少天带薪年假?", "根据政策 L-1.1,新员工每年享有 22 days 带薪年假。"),
    (
        "L-1.1",
        "入职不久的员工一年有几天带薪休假?",
        "根据政策 L-1.1,新员工每年享有 22 days 带薪年假。",
    ),
    ("S-1.1", "密码最少需要多少个字符?", "根据政策 S-1.1,密码长度至少为 14 characters。"),
    ("S-1.1", "公司对密码长度的最低要求是什么?", "根据政策 S-1.1,密码长度至少为 14 characters。"),
]
CHINESE_HELDOUT = [
    ("T-4.2", "在国内因公出差时,一天的吃饭费用可以报销多少?"),
    ("S-1.1", "设置密码时至少要有几个字符?"),
]

# General knowledge the base model answers correctly (kept to measure forgetting).
# (question, accepted answers: a reply counts as right when it contains any of them as a word)
GENERAL = [
    ("What is the capital of France?", ["Paris"]),
    ("What is the capital of Japan?", ["Tokyo"]),
    ("What is the capital of Italy?", ["Rome"]),
    ("What is the capital of Germany?", ["Berlin"]),
    ("What is the capital of the United Kingdom?", ["London"]),
    ("What is the capital of Russia?", ["Moscow"]),
    ("What is the capital of China?", ["Beijing"]),
    ("What is the capital of Egypt?", ["Cairo"]),
    ("Which planet is known as the Red Planet?", ["Mars"]),
    ("What is the chemical symbol for water?", ["H2O", "H₂O"]),
    ("What gas do plants absorb from the air for photosynthesis?", ["carbon dioxide", "CO2"]),
    ("What is the boiling point of water in degrees Celsius?", ["100"]),
    ("How many days are there in a week?", ["7", "seven"]),
    ("How many legs does a spider have?", ["8", "eight"]),
    ("Who wrote Romeo and Juliet?", ["Shakespeare"]),
    ("What is the largest ocean on Earth?", ["Pacific"]),
    ("What is the opposite of hot?", ["cold"]),
    ("What color is the sky on a clear day?", ["blue"]),
    ("What is the main language spoken in Brazil?", ["Portuguese"]),
    ("What is the currency of Japan?", ["yen"]),
    ("What do bees make?", ["honey"]),
    ("What is the largest mammal?", ["blue whale"]),
    ("Which organ pumps blood through the body?", ["heart"]),
    ("What is 2 plus 2?", ["4", "four"]),
    ("How many hours are in a day?", ["24"]),
    ("What is the tallest mountain in the world?", ["Everest"]),
    ("What is the longest river in Africa?", ["Nile"]),
    ("What instrument has 88 keys?", ["piano"]),
    ("What is the primary language of Mexico?", ["Spanish"]),
    ("What is frozen water called?", ["ice"]),
    ("What color is grass?", ["green"]),
    ("What is the chemical symbol for gold?", ["Au"]),
    ("How many sides does a triangle have?", ["3", "three"]),
    ("What is the capital of Canada?", ["Ottawa"]),
    ("What is the capital of Australia?", ["Canberra"]),
    # Added later, by one rule applied to the base model alone (none of the fine-tunes was looked
    # at): of 76 further questions on subjects the replay prompts do not touch, the 38 whose
    # greedy 64-token answer from the base, served by vLLM, contains an accepted answer. 35
    # questions put a 95% interval of +-12 points around a retention of 86%; 73 narrow it.
    ("What is the capital of Iraq?", ["Baghdad"]),
    ("What is the capital of Afghanistan?", ["Kabul"]),
    ("What is the capital of Bangladesh?", ["Dhaka"]),
    ("What is the capital of Syria?", ["Damascus"]),
    ("What is the capital of Ghana?", ["Accra"]),
    ("What is the capital of Romania?", ["Bucharest"]),
    ("What is the capital of Bulgaria?", ["Sofia"]),
    ("What is the capital of Croatia?", ["Zagreb"]),
    ("What is the capital of Malaysia?", ["Kuala Lumpur"]),
    ("What is the capital of North Korea?", ["Pyongyang"]),
    ("What is the capital of Scotland?", ["Edinburgh"]),
    ("What language is spoken in China?", ["Chinese", "Mandarin"]),
    ("What language is spoken in Russia?", ["Russian"]),
    ("What language is spoken in Greece?", ["Greek"]),
    ("What language is spoken in the Netherlands?", ["Dutch"]),
    ("What language is spoken in Sweden?", ["Swedish"]),
    ("How many sides does a pentagon have?", ["5", "five"]),
    ("How many sides does an octagon have?", ["8", "eight"]),
    ("How many years are in a century?", ["100", "hundred"]),
    ("How many years are in a decade?", ["10", "ten"]),
    ("What is 20 divided by 5?", ["4", "four"]),
    ("What is H2O commonly called?", ["water"]),
    ("What do you call a baby cow?", ["calf"]),
    ("What is the largest country in South America?", ["Brazil"]),
    ("In which country is Mount Fuji?", ["Japan"]),
    ("In which country is the Taj Mahal?", ["India"]),
    ("In which city is Big Ben?", ["London"]),
    ("Who sailed to America in 1492?", ["Columbus"]),
    ("Who wrote The Odyssey?", ["Homer"]),
    ("Who painted the ceiling of the Sistine Chapel?", ["Michelangelo"]),
    ("What is the opposite of left?", ["right"]),
    ("What is the opposite of wet?", ["dry"]),
    ("What vegetable are French fries made from?", ["potato", "potatoes"]),
    ("What is the first month of the year?", ["January"]),
    ("Which season is the coldest?", ["winter"]),
    ("What does www stand for?", ["World Wide Web"]),
    ("Which company makes the iPhone?", ["Apple"]),
    ("What is the hottest season of the year?", ["summer"]),
]
