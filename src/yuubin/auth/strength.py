"""Is a password too weak to set, and which guesses would an attacker try first?

Strength is zxcvbn's score (the Dropbox estimator, PyPI `zxcvbn`), with the account's own user
and domain names as inputs; a password containing either is refused outright, because that is
the first thing a targeted dictionary attack tries (the post's incident).
"""

from __future__ import annotations

import re

MIN_SCORE = 3  # zxcvbn 0-4; 3 = "safely unguessable: moderate protection from offline attacks"

# The most common passwords of the public breach corpora (SecLists / NCSC top lists), the first
# thing every submission-port brute-forcer tries.
COMMON_PASSWORDS = (
    "123456", "password", "123456789", "12345678", "12345", "qwerty", "1234567", "111111", "1234567890",
    "123123", "abc123", "1234", "password1", "iloveyou", "1q2w3e4r", "000000", "qwerty123", "zaq12wsx",
    "dragon", "sunshine", "princess", "letmein", "654321", "monkey", "27653", "1qaz2wsx", "123321",
    "qwertyuiop", "superman", "asdfghjkl", "football", "baseball", "welcome", "admin", "admin123",
    "passw0rd", "p@ssw0rd", "Password1", "Password123", "password123", "master", "hello", "freedom",
    "whatever", "qazwsx", "trustno1", "shadow", "michael", "jennifer", "hunter2", "starwars", "login",
    "secret", "changeme", "root", "toor", "test", "test123", "guest", "default", "123qwe", "q1w2e3r4",
    "1q2w3e", "aa123456", "abcd1234", "access", "mustang", "charlie", "donald", "batman", "ninja",
    "azerty", "solo", "loveme", "whatever1", "flower", "hottie", "666666", "888888", "121212", "112233",
    "987654321", "11111111", "00000000", "a123456", "qwe123", "pass", "pass123", "mail", "email",
    "webmaster", "postmaster", "user", "info", "demo", "summer", "winter", "spring", "autumn",
    "Summer2024", "Winter2024", "Spring2025", "Summer2025", "Winter2025", "Spring2026", "Summer2026",
    "qwerty1", "asdf1234", "zxcvbnm", "asdfgh", "computer", "internet", "samsung", "google",
    "tokyo", "japan", "sakura", "nippon", "pokemon", "naruto", "doraemon", "yamada", "tanaka", "suzuki",
)


def weakness(password: str, address: str) -> str | None:
    """Why `password` is too weak for `address`, or None when it is fine."""
    import zxcvbn

    user, _, domain = address.lower().rpartition("@")
    names = [p for p in [user, *re.split(r"[._+-]", user)] if len(p) >= 3]  # "jo" would refuse half the dictionary
    names += [label for label in domain.split(".") if len(label) >= 3 and label not in ("com", "net", "org")]
    low = password.lower()
    for name in dict.fromkeys(names):
        if name and name in low:
            return f"it contains the name {name!r} from the address"
    result = zxcvbn.zxcvbn(password[:100], user_inputs=names)
    if result["score"] < MIN_SCORE:
        fb = result.get("feedback") or {}
        hint = " ".join(x for x in [fb.get("warning") or "", *(fb.get("suggestions") or [])] if x)
        return f"it is too easy to guess (strength {result['score']}/4, needs {MIN_SCORE})" + (
            f": {hint}" if hint else "")
    return None


def audit_guesses(address: str) -> list[str]:
    """What an attacker would try against `address`: common passwords, then name variants."""
    user, _, domain = address.lower().rpartition("@")
    label = domain.split(".")[0]
    bases = list(dict.fromkeys([user, user.capitalize(), label, label.capitalize(), user + label]))
    variants = []
    for b in bases:
        variants += [b, b + "1", b + "123", b + "1234", b + "!", b + "2024", b + "2025", b + "2026",
                     b + "@123", b + b]
    # Targeted guesses first: a name variant is what falls to the fewest tries.
    return list(dict.fromkeys([*variants, domain, address, *COMMON_PASSWORDS]))
