"""Entity schemas and deterministic sample data for the Customer Insights stand-in."""

import random
import unicodedata
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Final, Literal

EdmType = Literal["Edm.String", "Edm.Int32", "Edm.Double", "Edm.Date", "Edm.DateTimeOffset"]
InstanceType = Literal["production", "sandbox", "trial"]
Scalar = str | int | float | None
Row = dict[str, Scalar]


@dataclass(frozen=True)
class EntitySchema:
    """An entity's name, key attribute and attribute types in output order."""

    name: str
    key: str
    attributes: Mapping[str, EdmType]
    # Stamped with the server clock on create when the client leaves it out.
    created: str | None = None


@dataclass
class Instance:
    """One Customer Insights environment and its tables (entity name → key → row)."""

    instance_id: str
    name: str
    instance_type: InstanceType
    region: str
    scale_unit_id: str
    is_b2b: bool
    is_b2c: bool
    expiry: datetime | None
    tables: dict[str, dict[str, Row]]


CUSTOMER: Final = EntitySchema(
    name="Customer",
    key="CustomerId",
    attributes={
        "CustomerId": "Edm.String",
        "FirstName": "Edm.String",
        "LastName": "Edm.String",
        "FullName": "Edm.String",
        "EMail": "Edm.String",
        "Telephone": "Edm.String",
        "City": "Edm.String",
        "Country": "Edm.String",
        "DateOfBirth": "Edm.Date",
        "LoyaltyPoints": "Edm.Int32",
        "CreatedOn": "Edm.DateTimeOffset",
    },
    created="CreatedOn",
)
UNIFIED_ACTIVITY: Final = EntitySchema(
    name="UnifiedActivity",
    key="ActivityId",
    attributes={
        "ActivityId": "Edm.String",
        "CustomerId": "Edm.String",
        "ActivityTime": "Edm.DateTimeOffset",
        "ActivityName": "Edm.String",
        "ActivityType": "Edm.String",
        "Title": "Edm.String",
        "Amount": "Edm.Double",
    },
)
SCHEMAS: Final[Mapping[str, EntitySchema]] = {s.name: s for s in (CUSTOMER, UNIFIED_ACTIVITY)}

# Generated moments fall in a fixed window so that a seed gives the same rows on every run.
_DATA_START: Final = datetime(2022, 1, 1, tzinfo=UTC)
_DATA_END: Final = datetime(2025, 6, 30, tzinfo=UTC)
_TRIAL_DAYS: Final = 30

# name, type, region, scale unit, customers, B2B, B2C
_INSTANCES: Final[tuple[tuple[str, InstanceType, str, str, int, bool, bool], ...]] = (
    ("Contoso Retail", "production", "westeurope", "weu-prod-su3", 300, False, True),
    ("Contoso Retail (UAT)", "sandbox", "westeurope", "weu-prod-su3", 80, False, True),
    ("Fabrikam Trial", "trial", "eastus", "eus-trial-su1", 40, True, False),
)
_FIRST_NAMES: Final = (
    "Ana", "Ben", "Chloé", "David", "Elif", "Fatima", "George", "Hannah", "Ivan", "Jasmine",
    "José", "Karin", "Liam", "Maria", "Noah", "Olivia", "Pierre", "Sofia", "Tomás", "Zoë",
)  # fmt: skip
_LAST_NAMES: Final = (
    "Andersson", "Brown", "Dubois", "Fischer", "García", "Jensen", "Kowalski", "Martin",
    "Müller", "Nakamura", "O'Brien", "Rossi", "Schmidt", "Silva", "Smith", "Wilson",
)  # fmt: skip
_PLACES: Final = (
    ("London", "United Kingdom", "+44 20"),
    ("Manchester", "United Kingdom", "+44 161"),
    ("Paris", "France", "+33 1"),
    ("Lyon", "France", "+33 4"),
    ("Berlin", "Germany", "+49 30"),
    ("München", "Germany", "+49 89"),
    ("Madrid", "Spain", "+34 91"),
    ("Seattle", "United States", "+1 206"),
    ("Toronto", "Canada", "+1 416"),
    ("Sydney", "Australia", "+61 2"),
)
_DOMAINS: Final = ("contoso.com", "fabrikam.net", "example.org", "outlook.com")
# type, name, title template, carries an amount
_ACTIVITIES: Final = (
    ("Purchase", "Online order", "Order {n}", True),
    ("Purchase", "In-store purchase", "Receipt {n}", True),
    ("WebVisit", "Product page view", "Viewed {product}", False),
    ("Email", "Email opened", "Opened: {campaign}", False),
    ("SupportCase", "Case opened", "Case {n}: {topic}", False),
)
_PRODUCTS: Final = ("Trail running shoes", "Rain jacket", "Espresso machine", "Desk lamp")
_CAMPAIGNS: Final = ("Spring sale", "Loyalty rewards", "New arrivals", "Black Friday")
_TOPICS: Final = ("late delivery", "refund", "damaged item", "account access")


def format_datetime(moment: datetime) -> str:
    """Render an aware moment as the API does: UTC, whole seconds, a trailing Z."""
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def generate_instances(rng: random.Random, now: datetime) -> dict[str, Instance]:
    """Build the sample instances keyed by instance id; trials expire relative to now."""
    instances: dict[str, Instance] = {}
    for name, kind, region, scale_unit, customers, b2b, b2c in _INSTANCES:
        instance_id = str(_guid(rng))
        expiry = now + timedelta(days=_TRIAL_DAYS) if kind == "trial" else None
        rows = [_customer(rng) for _ in range(customers)]
        instances[instance_id] = Instance(
            instance_id=instance_id,
            name=name,
            instance_type=kind,
            region=region,
            scale_unit_id=scale_unit,
            is_b2b=b2b,
            is_b2c=b2c,
            expiry=expiry,
            tables={
                CUSTOMER.name: {_key(row, CUSTOMER): row for row in rows},
                UNIFIED_ACTIVITY.name: {
                    _key(row, UNIFIED_ACTIVITY): row for row in _activities(rng, rows)
                },
            },
        )
    return instances


def new_key(rng: random.Random) -> str:
    """Return a key in the API's unified-record style: 32 hex digits, no dashes."""
    return _guid(rng).hex


def _guid(rng: random.Random) -> uuid.UUID:
    # Drawn from the seeded generator, unlike uuid4(), so ids repeat from run to run.
    return uuid.UUID(int=rng.getrandbits(128), version=4)


def _key(row: Row, schema: EntitySchema) -> str:
    return str(row[schema.key])


def _customer(rng: random.Random) -> Row:
    first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
    city, country, dialling_code = rng.choice(_PLACES)
    mailbox = _ascii(f"{first}.{last}").replace("'", "").lower()
    return {
        "CustomerId": new_key(rng),
        "FirstName": first,
        "LastName": last,
        "FullName": f"{first} {last}",
        "EMail": f"{mailbox}{rng.randint(1, 99)}@{rng.choice(_DOMAINS)}",
        "Telephone": f"{dialling_code} {rng.randint(100, 999)} {rng.randint(1000, 9999)}",
        "City": city,
        "Country": country,
        "DateOfBirth": (date(1950, 1, 1) + timedelta(days=rng.randrange(20_000))).isoformat(),
        "LoyaltyPoints": rng.randrange(0, 5000, 5),
        "CreatedOn": format_datetime(_moment(rng, _DATA_START)),
    }


def _activities(rng: random.Random, customers: list[Row]) -> list[Row]:
    rows: list[Row] = []
    for customer in customers:
        since = datetime.fromisoformat(str(customer["CreatedOn"]))
        for _ in range(rng.randint(0, 5)):
            kind, name, template, priced = rng.choice(_ACTIVITIES)
            title = template.format(
                n=rng.randint(10_000, 99_999),
                product=rng.choice(_PRODUCTS),
                campaign=rng.choice(_CAMPAIGNS),
                topic=rng.choice(_TOPICS),
            )
            rows.append(
                {
                    "ActivityId": new_key(rng),
                    "CustomerId": customer["CustomerId"],
                    "ActivityTime": format_datetime(_moment(rng, since)),
                    "ActivityName": name,
                    "ActivityType": kind,
                    "Title": title,
                    "Amount": round(rng.uniform(5, 500), 2) if priced else None,
                }
            )
    return rows


def _moment(rng: random.Random, start: datetime) -> datetime:
    seconds = int((_DATA_END - start).total_seconds())
    return start + timedelta(seconds=rng.randrange(seconds))


def _ascii(text: str) -> str:
    # Mailbox names drop accents the way people type them: "Müller" → "muller".
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
