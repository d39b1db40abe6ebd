"""The embedded default dataset: a synthetic multi-scenario interaction log with
planted content → behaviour structure.

Latent model (every draw seeded; same config → byte-identical files):

* **Topics.** ``num_topics`` (≤ 24) topics, each with a list of real English words
  (cooking, travel, fitness, finance, pets, gaming, ...), so that a real text encoder
  such as MiniLM puts items of the same topic close together.
* **Items.** A dominant topic ``z_i`` (topic sizes ~ Dirichlet) and a secondary topic
  ``y_i`` with weight ``s_i ~ U(0.05, 0.3)``: topic mix
  ``theta_i = (1 - s_i) e_{z_i} + s_i e_{y_i}``; Zipf popularity; a quality bias
  ``q_i ~ N(0, quality_std)``. Text from templates: a title-like sentence, body
  sentences whose words come from the dominant topic (secondary with probability
  ``s_i``), generic filler; the number of sentences is log-normal, so texts range
  from a short title to a few hundred words.
* **Users.** Categorical ``age_group`` (5) and ``region`` (6); each attribute value has
  its own topic prior, and the interests ``pi_u ~ Dirichlet`` are centred on the
  mixture of the user's attribute priors (so attributes predict interests). Activity
  is log-normal; each user has scenario propensities around ``scenario_shares``
  (default homefeed/search/ads = 75/15/10 %).
* **Cross-scenario intent.** Each user has a long-lasting intent topic ``tau_u`` (never
  their main interest) that starts at ``intent_start_u`` (in the first quarter of the
  time span) and lasts to the end. After it starts, ``intent_share_sparse`` (60 %) of
  the user's search/ads impressions are intent-topic items, but only
  ``intent_share_homefeed`` (10 %) of homefeed impressions; the intent raises the
  click probability in every scenario. So search/ads histories reveal the intent that
  drives future homefeed clicks.
* **Impressions** mix popularity (``pop_share`` per scenario) with interest: a topic
  drawn from ``pi_u`` (or the intent), then an item of that topic by popularity.
* **Clicks** ``~ Bernoulli(sigmoid(a * aff + b * intent + q_i + scenario_bias + c))``
  with ``aff = theta_i . pi_u / max(pi_u)`` in [0, 1], ``intent = theta_i[tau_u]`` once
  the intent started, and ``c`` calibrated so the overall CTR is ``target_ctr``.
  Given a click, ``is_like``/``is_share``/``is_collect`` are Bernoulli with a
  probability rising with affinity. ``duration`` is log-normal, longer for clicks and
  for high affinity.
* **Time.** ``days`` days from ``start_time``; day uniform, hour of day from a daily
  activity curve (evening peak); per-user timestamps increase.

Ground truth is saved as ``synth_truth.safetensors`` in the dataset directory
(see :data:`TRUTH_FILE`) for plant-recovery tests.

Example::

    generate(SynthConfig(num_users=2000, num_items=5000, num_interactions=200_000),
             "out/synth")
"""

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch
from tqdm import tqdm

from torchrec_mm.data.io import DatasetWriter
from torchrec_mm.data.schema import DatasetMeta
from torchrec_mm.utils.io import load_tensors, save_tensors

logger = logging.getLogger(__name__)

TRUTH_FILE = "synth_truth.safetensors"
SCENARIOS = ["homefeed", "search", "ads"]
ACTIONS = ["is_click", "is_like", "is_share", "is_collect"]
AGE_GROUPS = ["18-24", "25-34", "35-44", "45-54", "55+"]
REGIONS = ["north", "south", "east", "west", "central", "overseas"]

# Topic vocabularies: real English words, disjoint across topics.
TOPICS: List[Tuple[str, List[str]]] = [
    ("cooking", ["recipe", "pasta", "garlic", "simmer", "sauce", "chicken", "dinner",
                 "kitchen", "skillet", "roast", "spices", "onion", "tomato sauce", "noodles",
                 "soup", "chef", "grill", "marinade", "broth", "stew", "seasoning",
                 "meal prep", "dumplings", "curry", "stir fry", "frying pan", "salad"]),
    ("travel", ["flight", "passport", "hotel", "beach", "itinerary", "backpacking",
                "airport", "luggage", "island", "sightseeing", "tourist", "vacation",
                "resort", "destination", "road trip", "hostel", "cruise", "landmarks",
                "train ride", "souvenir", "visa", "guidebook", "abroad", "city break",
                "jet lag", "boarding pass", "old town"]),
    ("fitness", ["workout", "gym", "squats", "cardio", "muscle", "protein shake",
                 "treadmill", "stretching", "dumbbell", "running", "strength", "endurance",
                 "calories", "push-ups", "yoga", "marathon", "deadlift", "core workout",
                 "sweat", "reps", "personal trainer", "HIIT", "abs", "warm up", "sprint",
                 "kettlebell", "plank", "weightlifting"]),
    ("finance", ["investing", "stocks", "budget", "savings", "retirement", "dividend",
                 "mortgage", "interest rate", "portfolio", "credit card", "tax return",
                 "loan", "index fund", "inflation", "income", "expenses", "debt", "bonds",
                 "crypto", "bank account", "salary", "compound interest", "emergency fund",
                 "pension", "stock market", "brokerage", "net worth", "frugal living"]),
    ("pets", ["puppy", "kitten", "dog", "cat", "veterinarian", "leash", "pet grooming",
              "pet food", "adoption", "litter box", "paws", "fur", "dog treats", "collar",
              "aquarium", "hamster", "parrot", "chew toy", "fetch", "kennel", "purring",
              "barking", "rescue dog", "pet bed", "fleas", "whiskers", "animal shelter"]),
    ("gaming", ["console", "controller", "multiplayer", "quest", "level up", "boss fight",
                "speedrun", "esports", "gaming headset", "gameplay", "RPG", "shooter", "loot",
                "respawn", "patch notes", "strategy game", "gamer", "leaderboard",
                "open world", "graphics card", "co-op", "achievement", "dungeon", "arcade",
                "joystick", "indie game", "save file", "raid"]),
    ("music", ["guitar", "piano", "concert", "melody", "chords", "playlist", "album",
               "singer", "drums", "lyrics", "music festival", "band", "vinyl", "rhythm",
               "songwriting", "orchestra", "violin", "bass line", "karaoke", "jazz",
               "rock band", "hip hop", "tempo", "microphone", "recording studio", "harmony",
               "encore", "setlist"]),
    ("fashion", ["outfit", "dress", "sneakers", "jacket", "denim", "handbag", "wardrobe",
                 "accessories", "streetwear", "runway", "tailoring", "boots", "scarf",
                 "jewelry", "vintage clothes", "designer", "fabric", "fashion trend",
                 "lookbook", "blazer", "heels", "sunglasses", "capsule wardrobe", "knitwear",
                 "thrift store", "belt", "silk", "skirt"]),
    ("gardening", ["seeds", "soil", "compost", "watering can", "garden bed", "pruning",
                   "flowers", "succulents", "greenhouse", "fertilizer", "weeds", "seedlings",
                   "harvest", "roses", "potting mix", "mulch", "trowel", "orchard", "sprouts",
                   "perennials", "houseplants", "flower pots", "lawn", "blooming",
                   "vegetable patch", "shovel", "hedge", "tulip bulbs"]),
    ("photography", ["camera", "lens", "aperture", "shutter speed", "tripod", "portrait",
                     "landscape photo", "exposure", "photo editing", "lightroom",
                     "golden hour", "composition", "autofocus", "ISO", "zoom lens",
                     "mirrorless", "film camera", "flash", "depth of field", "photoshoot",
                     "bokeh", "raw files", "street photography", "drone shots", "prints",
                     "megapixels", "macro shot"]),
    ("parenting", ["toddler", "baby", "diaper", "bedtime", "newborn", "stroller",
                   "preschool", "nursery", "breastfeeding", "tantrum", "playdate", "lullaby",
                   "pacifier", "kids", "milestones", "potty training", "daycare", "crib",
                   "babysitter", "parenting tips", "school run", "teething", "siblings",
                   "playground", "bath time", "storytime", "car seat"]),
    ("cars", ["engine", "sedan", "horsepower", "tires", "electric vehicle", "mileage",
              "dashboard", "gearbox", "brakes", "motor", "fuel", "hybrid car", "SUV",
              "oil change", "turbo", "garage", "dealership", "steering wheel", "test drive",
              "convertible", "torque", "charging station", "exhaust", "transmission",
              "headlights", "car wash", "windshield", "mechanic"]),
    ("technology", ["smartphone", "laptop", "software", "app", "battery life", "processor",
                    "gadget", "keyboard", "coding", "cloud", "wifi", "charger",
                    "operating system", "startup", "artificial intelligence", "programming",
                    "tablet", "smartwatch", "browser", "developer", "cybersecurity", "chip",
                    "bluetooth", "server", "algorithm", "touchscreen", "robot"]),
    ("movies", ["film", "director", "actor", "trailer", "cinema", "screenplay", "box office",
                "popcorn", "premiere", "Oscar", "thriller", "comedy", "documentary",
                "plot twist", "cast", "blockbuster", "animated film", "horror film",
                "TV series", "soundtrack", "villain", "superhero", "film festival",
                "movie ending", "remake", "actress", "movie night"]),
    ("books", ["novel", "author", "chapter", "library", "bookshelf", "reading list",
               "paperback", "poetry", "fiction", "memoir", "bestseller", "bookstore",
               "hardcover", "literature", "mystery novel", "book club", "ebook", "biography",
               "page turner", "fantasy series", "classics", "bookmark", "prose", "narrator",
               "audiobook", "short stories"]),
    ("home decor", ["living room", "sofa", "cushions", "curtains", "rug", "lamp",
                    "wallpaper", "shelves", "interior design", "bedroom", "candles",
                    "paint color", "furniture", "mirror", "minimalist", "vase",
                    "throw blanket", "coffee table", "renovation", "tiles", "cozy corner",
                    "storage baskets", "kitchen cabinets", "farmhouse style", "bathroom",
                    "makeover", "apartment"]),
    ("skincare", ["moisturizer", "serum", "sunscreen", "cleanser", "makeup", "lipstick",
                  "foundation", "skincare routine", "acne", "hydration", "mascara", "toner",
                  "face mask", "eyeliner", "retinol", "glowing skin", "blush", "nail polish",
                  "perfume", "shampoo", "concealer", "exfoliate", "pores", "vitamin C",
                  "lashes", "eyeshadow", "wrinkles"]),
    ("hiking", ["trail", "mountain", "summit", "camping", "tent", "backpack", "hiking boots",
                "forest", "waterfall", "campfire", "national park", "sleeping bag",
                "compass", "wildlife", "canyon", "lake", "climbing", "trekking poles",
                "sunrise", "ridge", "wilderness", "valley", "glacier", "picnic",
                "scenic view", "elevation", "alpine"]),
    ("soccer", ["football", "goal", "striker", "match", "stadium", "league", "penalty",
                "coach", "midfielder", "tournament", "referee", "fans", "championship",
                "goalkeeper", "transfer", "dribble", "kickoff", "world cup", "tactics",
                "defender", "free kick", "jersey", "scoreboard", "derby", "pitch",
                "final whistle"]),
    ("space", ["planet", "telescope", "galaxy", "astronaut", "rocket", "orbit", "nebula",
               "moon", "mars", "stars", "black hole", "satellite", "cosmos", "physics",
               "experiment", "laboratory", "solar system", "asteroid", "comet", "gravity",
               "spacecraft", "universe", "eclipse", "observatory", "quantum", "meteor",
               "scientists"]),
    ("art", ["painting", "canvas", "watercolor", "sketch", "paint brush", "gallery",
             "acrylic", "sculpture", "palette", "exhibition", "illustration", "charcoal",
             "artist", "museum", "oil paint", "ceramics", "pottery", "calligraphy",
             "masterpiece", "easel", "abstract art", "mural", "printmaking", "sketchbook",
             "pastel", "drawing", "collage"]),
    ("baking", ["espresso", "latte", "cappuccino", "croissant", "bakery", "sourdough",
                "cake", "cookies", "pastry", "dough", "flour", "frosting", "brownies",
                "muffins", "coffee beans", "barista", "cafe", "cinnamon rolls", "whisk",
                "chocolate", "vanilla", "cheesecake", "baking soda", "cupcakes", "tart",
                "bread loaf", "cold brew", "macarons"]),
    ("weddings", ["bride", "groom", "wedding dress", "ceremony", "bouquet", "reception",
                  "engagement ring", "vows", "bridesmaids", "honeymoon", "venue",
                  "wedding cake", "invitations", "veil", "proposal", "tuxedo", "first dance",
                  "guest list", "wedding planner", "florist", "toast", "aisle",
                  "anniversary", "bachelorette", "rehearsal dinner", "centerpieces",
                  "marriage"]),
    ("studying", ["exam", "study notes", "university", "lecture", "homework", "classroom",
                  "teacher", "students", "online course", "scholarship", "textbook",
                  "revision", "grades", "campus", "language learning", "vocabulary",
                  "tutoring", "flashcards", "essay", "degree", "math", "graduation",
                  "research paper", "study tips", "deadline", "semester", "certificate"]),
]
MAX_TOPICS = len(TOPICS)

_TITLES = [
    "My favorite {a} tips", "A beginner's guide to {a}", "{A} and {b}: what I learned",
    "10 {a} ideas you need to try", "How I got into {a}", "Why {a} matters more than {b}",
    "Weekend {a} diary", "The best {a} for {b} lovers", "Honest review: {a} and {b}",
    "{A} mistakes to avoid", "Everything about {a}", "Quick {a} guide",
    "{A}, {b} and me", "What nobody tells you about {a}", "Trying {a} for the first time",
]
_BODY = [
    "Today I want to talk about {a}.", "I tried {a} with {b} and it worked really well.",
    "If you love {a}, you will enjoy this.", "The secret is {a}, plus a little {b}.",
    "Here is my take on {a}.", "Do not forget the {a}.",
    "{A} changed the way I think about {b}.", "My friends asked about {a}, so here we go.",
    "#{a} #{b}", "Step one: {a}. Step two: {b}.", "I spent the whole week on {a}.",
    "Nothing beats {a} on a slow morning.", "Compared with {b}, {a} felt easier.",
    "A quick note on {a} and {b}.",
]
_FILLER = [
    "Thanks for reading!", "Let me know what you think in the comments.",
    "Save this for later.", "It was a long day but worth it.", "More updates soon.",
    "Follow for more.", "I hope this helps someone.", "What would you add?",
    "Honestly, I did not expect this.", "Posted on a quiet afternoon.",
    "This is just my personal experience.", "See you next time.",
]
# relative activity by hour of day (evening peak, night trough)
_HOUR_WEIGHTS = np.array([1.0, 0.6, 0.4, 0.3, 0.3, 0.4, 0.8, 1.5, 2.0, 2.0, 2.0, 2.3, 3.0,
                          2.8, 2.2, 2.0, 2.0, 2.3, 2.8, 3.5, 4.0, 4.0, 3.2, 2.0])


@dataclass
class SynthConfig:
    """Configuration of :func:`generate` (every field is recorded in ``meta.source``).

    Attributes:
        num_users / num_items / num_interactions: sizes.
        num_topics: latent topics (at most :data:`MAX_TOPICS`).
        seed: random seed; same config → identical files.
        days: time span; ``start_time``: unix time of its start.
        scenario_shares: mean share of homefeed / search / ads.
        target_ctr: overall click rate the click bias is calibrated to.
        affinity_scale: ``a`` in the click logit; ``intent_scale``: ``b``.
        quality_std: std of the item quality bias.
        zipf_exponent: item popularity ``∝ rank^-zipf_exponent``.
        interest_concentration: Dirichlet concentration of user interests per topic
            (smaller → more focused users).
        activity_sigma: log-normal sigma of user activity.
        pop_share: per scenario, the share of impressions drawn by popularity.
        intent_share_sparse / intent_share_homefeed: share of impressions from the
            intent topic (once started) in search/ads and in homefeed.
        min_user_interactions: lower bound of interactions per user.
        name: dataset name.
    """

    num_users: int = 2000
    num_items: int = 5000
    num_interactions: int = 200_000
    num_topics: int = 16
    seed: int = 0
    days: float = 60.0
    start_time: int = 1_700_006_400  # 2023-11-15 00:00 UTC
    scenario_shares: Tuple[float, float, float] = (0.75, 0.15, 0.10)
    target_ctr: float = 0.2
    affinity_scale: float = 4.0
    intent_scale: float = 3.0
    quality_std: float = 0.5
    scenario_bias: Tuple[float, float, float] = (0.0, 0.5, -0.5)
    zipf_exponent: float = 0.9
    interest_concentration: float = 0.3
    activity_sigma: float = 1.0
    pop_share: Tuple[float, float, float] = (0.3, 0.1, 0.3)
    intent_share_sparse: float = 0.6
    intent_share_homefeed: float = 0.1
    min_user_interactions: int = 5
    name: str = "synth"

    def validate(self) -> None:
        if not 1 <= self.num_topics <= MAX_TOPICS:
            raise ValueError(f"num_topics must be in [1, {MAX_TOPICS}], got {self.num_topics}")
        if self.num_topics < 2:
            raise ValueError("num_topics must be >= 2 (the intent topic differs from "
                             "the main interest)")
        if self.num_items < self.num_topics:
            raise ValueError(f"num_items ({self.num_items}) must be >= num_topics "
                             f"({self.num_topics})")
        if self.num_users < 1 or self.num_interactions < self.num_users:
            raise ValueError("need num_users >= 1 and num_interactions >= num_users")
        if (len(self.scenario_shares) != 3 or min(self.scenario_shares) <= 0
                or abs(sum(self.scenario_shares) - 1) > 1e-6):
            raise ValueError("scenario_shares must be 3 positive numbers summing to 1, "
                             f"got {self.scenario_shares}")
        if not 0 < self.target_ctr < 1:
            raise ValueError("target_ctr must be in (0, 1)")
        for name in ("intent_share_sparse", "intent_share_homefeed"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if len(self.pop_share) != 3 or not all(0.0 <= v <= 1.0 for v in self.pop_share):
            raise ValueError(f"pop_share must be 3 numbers in [0, 1], got {self.pop_share}")
        for name in ("zipf_exponent", "quality_std"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class SynthTruth:
    """The latent variables (all arrays indexed by dense ids).

    Attributes:
        item_topic: [I] int64 dominant topic; item_topic2: [I] secondary topic;
        item_topic_mix: [I, K] float32 theta; item_quality: [I]; item_popularity: [I]
            (sums to 1);
        user_interest: [U, K] float32 pi; user_intent_topic: [U] int64;
        user_intent_start: [U] int64 unix time; user_age_group / user_region: [U].
        topic_names: K names; topic_words: K word lists.
    """

    item_topic: np.ndarray
    item_topic2: np.ndarray
    item_topic_mix: np.ndarray
    item_quality: np.ndarray
    item_popularity: np.ndarray
    user_interest: np.ndarray
    user_intent_topic: np.ndarray
    user_intent_start: np.ndarray
    user_age_group: np.ndarray
    user_region: np.ndarray
    topic_names: List[str]
    topic_words: List[List[str]]

    _ARRAYS = ("item_topic", "item_topic2", "item_topic_mix", "item_quality",
               "item_popularity", "user_interest", "user_intent_topic", "user_intent_start",
               "user_age_group", "user_region")

    def save(self, path: str) -> None:
        save_tensors(path, {k: torch.from_numpy(np.ascontiguousarray(getattr(self, k)))
                            for k in self._ARRAYS},
                     # one metadata key: safetensors writes several in random order,
                     # and the file must be byte-identical for the same seed
                     metadata={"topics": json.dumps({"names": self.topic_names,
                                                     "words": self.topic_words})})

    @staticmethod
    def load(data_dir: str) -> "SynthTruth":
        """Reads ``synth_truth.safetensors`` of a synthetic dataset directory."""
        from safetensors import safe_open

        path = os.path.join(data_dir, TRUTH_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: {data_dir} is not a synthetic dataset")
        tensors = load_tensors(path)
        with safe_open(path, framework="pt") as f:
            md = f.metadata() or {}
        topics = json.loads(md.get("topics", "{}"))
        return SynthTruth(**{k: tensors[k].numpy() for k in SynthTruth._ARRAYS},
                          topic_names=topics.get("names", []),
                          topic_words=topics.get("words", []))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _calibrate_bias(logits: np.ndarray, target: float) -> float:
    """``c`` such that ``mean(sigmoid(logits + c)) == target`` (bisection)."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _sigmoid(logits + mid).mean() < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _sample_rows(cdf_flat: np.ndarray, rows: np.ndarray, width: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Draws one column per entry of ``rows`` from per-row categorical distributions.

    ``cdf_flat`` [R * width] holds ``row + cumsum(p_row)`` (each row's CDF shifted by its
    row index), so one ``searchsorted`` samples all rows at once.
    """
    r = rng.random(len(rows))
    pos = np.searchsorted(cdf_flat, rows + r, side="right")
    return np.clip(pos - rows * width, 0, width - 1)


def _shifted_cdf(p: np.ndarray) -> np.ndarray:
    """[R, W] probabilities → flat [R * W] per-row CDFs shifted by the row index."""
    c = np.cumsum(p / p.sum(1, keepdims=True), axis=1)
    c[:, -1] = 1.0
    return (c * (1 - 1e-12) + np.arange(len(p))[:, None]).ravel()


def _items(cfg: SynthConfig, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    K, I = cfg.num_topics, cfg.num_items
    topic_size = rng.dirichlet(np.full(K, 5.0))
    topic = rng.choice(K, size=I, p=topic_size)
    topic[rng.permutation(I)[:K]] = np.arange(K)  # every topic has an item
    topic2 = (topic + 1 + rng.integers(0, K - 1, size=I)) % K
    s = rng.uniform(0.05, 0.3, size=I)
    mix = np.zeros((I, K), np.float32)
    mix[np.arange(I), topic] = 1 - s
    mix[np.arange(I), topic2] = s
    rank = rng.permutation(I)
    pop = (rank + 1.0) ** -cfg.zipf_exponent
    pop /= pop.sum()
    quality = rng.normal(0.0, cfg.quality_std, size=I)
    return {"topic": topic, "topic2": topic2, "secondary": s, "mix": mix,
            "pop": pop, "quality": quality}


def _item_texts(cfg: SynthConfig, items: Dict[str, np.ndarray],
                rng: np.random.Generator) -> List[str]:
    """Template text per item; topic words reveal the topic mix."""
    I = cfg.num_items
    words = [w for _, w in TOPICS[: cfg.num_topics]]
    n_words = np.array([len(w) for w in words])
    n_body = np.minimum(np.floor(rng.lognormal(np.log(2.5), 1.0, size=I)), 40).astype(int)
    n_body[rng.random(I) < 0.15] = 0  # title-only items
    n_fill = rng.poisson(0.5 + n_body / 4.0)
    title_t = rng.integers(0, len(_TITLES), size=I)
    # per item: 2 title words; per body sentence: template + 2 words + topic choice
    total_body = int(n_body.sum())
    body_item = np.repeat(np.arange(I), n_body)
    body_t = rng.integers(0, len(_BODY), size=total_body)
    body_topic = np.where(rng.random(total_body) < items["secondary"][body_item],
                          items["topic2"][body_item], items["topic"][body_item])
    body_w = _two_distinct(n_words[body_topic], rng)
    title_w = _two_distinct(n_words[items["topic"]], rng)
    fill_t = rng.integers(0, len(_FILLER), size=int(n_fill.sum()))
    fill_pos = rng.random(int(n_fill.sum()))  # where in the body the filler goes
    b_off = np.concatenate([[0], np.cumsum(n_body)])
    f_off = np.concatenate([[0], np.cumsum(n_fill)])
    texts: List[str] = []
    for i in tqdm(range(I), desc="item texts", leave=False, disable=None):
        tw = words[items["topic"][i]]
        a, b = tw[title_w[i, 0]], tw[title_w[i, 1]]
        parts = [_TITLES[title_t[i]].format(a=a, b=b, A=a[:1].upper() + a[1:]) + "."]
        sentences = []
        for j in range(b_off[i], b_off[i + 1]):
            ww = words[body_topic[j]]
            a, b = ww[body_w[j, 0]], ww[body_w[j, 1]]
            sentences.append(_BODY[body_t[j]].format(a=a, b=b, A=a[:1].upper() + a[1:]))
        for j in range(f_off[i], f_off[i + 1]):
            sentences.insert(int(fill_pos[j] * (len(sentences) + 1)), _FILLER[fill_t[j]])
        texts.append(" ".join(parts + sentences))
    return texts


def _two_distinct(n: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[m, 2] two distinct word indices per row, row j drawing from ``range(n[j])``."""
    first = (rng.random(len(n)) * n).astype(np.int64)
    second = (first + 1 + (rng.random(len(n)) * (n - 1)).astype(np.int64)) % n
    return np.stack([first, second], 1)


def _users(cfg: SynthConfig, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    K, U = cfg.num_topics, cfg.num_users
    age = rng.choice(len(AGE_GROUPS), size=U, p=[0.25, 0.3, 0.2, 0.15, 0.1])
    region = rng.choice(len(REGIONS), size=U)
    age_prior = rng.dirichlet(np.full(K, 0.5), size=len(AGE_GROUPS))
    region_prior = rng.dirichlet(np.full(K, 0.5), size=len(REGIONS))
    base = 0.45 * age_prior[age] + 0.35 * region_prior[region] + 0.2 / K
    alpha = np.maximum(cfg.interest_concentration * K * base, 1e-3)
    interest = rng.standard_gamma(alpha)
    interest = np.maximum(interest, 1e-12)
    interest /= interest.sum(1, keepdims=True)
    main = interest.argmax(1)
    intent = (main + 1 + rng.integers(0, K - 1, size=U)) % K
    span = int(cfg.days * 86400)
    intent_start = cfg.start_time + (rng.random(U) * 0.25 * span).astype(np.int64)
    activity = rng.lognormal(0.0, cfg.activity_sigma, size=U)
    m = min(cfg.min_user_interactions, cfg.num_interactions // U)
    counts = m + rng.multinomial(cfg.num_interactions - m * U, activity / activity.sum())
    shares = np.asarray(cfg.scenario_shares, np.float64)
    scen_p = rng.dirichlet(30.0 * shares, size=U)
    return {"age": age, "region": region, "interest": interest, "intent": intent,
            "intent_start": intent_start, "counts": counts, "scen_p": scen_p}


def _interactions(cfg: SynthConfig, items: Dict[str, np.ndarray], users: Dict[str, np.ndarray],
                  rng: np.random.Generator) -> Dict[str, np.ndarray]:
    K, I, U = cfg.num_topics, cfg.num_items, cfg.num_users
    N = cfg.num_interactions
    user = np.repeat(np.arange(U), users["counts"])
    # time: uniform day, hour of day from the daily curve, then sorted per user
    day = rng.integers(0, max(int(cfg.days), 1), size=N)
    hour = rng.choice(24, size=N, p=_HOUR_WEIGHTS / _HOUR_WEIGHTS.sum())
    ts = cfg.start_time + day * 86400 + hour * 3600 + rng.integers(0, 3600, size=N)
    order = np.lexsort((ts, user))
    ts = ts[order]
    # scenario from the user's propensities
    scen = _sample_rows(_shifted_cdf(users["scen_p"]), user, 3, rng).astype(np.int16)
    active = ts >= users["intent_start"][user]
    # topic of the impression: interest, or the intent topic once it started
    topic = _sample_rows(_shifted_cdf(users["interest"]), user, K, rng)
    r = rng.random(N)
    intent_share = np.where(scen == 0, cfg.intent_share_homefeed, cfg.intent_share_sparse)
    use_intent = active & (r < intent_share)
    topic = np.where(use_intent, users["intent"][user], topic)
    # item within the topic by popularity; or a popular item overall
    by_topic = np.lexsort((np.arange(I), items["topic"]))
    pop_sorted = items["pop"][by_topic]
    topic_sorted = items["topic"][by_topic]
    topic_mass = np.bincount(topic_sorted, weights=pop_sorted, minlength=K)
    topic_start = np.concatenate([[0], np.cumsum(topic_mass)[:-1]])
    within = np.cumsum(pop_sorted) - topic_start[topic_sorted]
    cdf = topic_sorted + np.minimum(within / topic_mass[topic_sorted], 1.0) * (1 - 1e-12)
    pos = np.searchsorted(cdf, topic + rng.random(N), side="right")
    item = by_topic[np.minimum(pos, I - 1)]
    pop_mode = rng.random(N) < np.asarray(cfg.pop_share)[scen]
    pop_cdf = np.cumsum(items["pop"])
    pop_item = np.minimum(np.searchsorted(pop_cdf, rng.random(N) * pop_cdf[-1], side="right"),
                          I - 1)
    item = np.where(pop_mode, pop_item, item)
    # click model
    interest = users["interest"]
    s = items["secondary"][item]
    aff = ((1 - s) * interest[user, items["topic"][item]]
           + s * interest[user, items["topic2"][item]])
    aff = aff / interest.max(1)[user]
    intent_aff = np.where(active, items["mix"][item, users["intent"][user]], 0.0)
    logit = (cfg.affinity_scale * aff + cfg.intent_scale * intent_aff + items["quality"][item]
             + np.asarray(cfg.scenario_bias)[scen])
    bias = _calibrate_bias(logit, cfg.target_ctr)
    click = rng.random(N) < _sigmoid(logit + bias)
    engage = np.clip(aff + intent_aff, 0.0, 1.0)
    like = click & (rng.random(N) < _sigmoid(3.0 * engage - 2.0))
    share = click & (rng.random(N) < _sigmoid(3.0 * engage - 3.5))
    collect = click & (rng.random(N) < _sigmoid(3.0 * engage - 3.0))
    actions = (click.astype(np.int64) | like.astype(np.int64) << 1
               | share.astype(np.int64) << 2 | collect.astype(np.int64) << 3)
    mu = np.where(click, np.log(15.0) + engage, np.log(2.0))
    duration = np.exp(mu + rng.normal(0.0, np.where(click, 0.7, 0.6))).astype(np.float32)
    return {"user_id": user, "item_id": item, "scenario": scen, "timestamp": ts,
            "label": click.astype(np.int8), "actions": actions, "duration": duration,
            "click_bias": np.array(bias)}


def generate(config: SynthConfig, out_dir: str, overwrite: bool = False) -> DatasetMeta:
    """Generates the synthetic dataset into ``out_dir`` (atomically).

    Returns:
        the dataset's :class:`DatasetMeta`; the latent variables are in
        ``out_dir/synth_truth.safetensors`` (:meth:`SynthTruth.load`).
    """
    config.validate()
    seeds = np.random.SeedSequence(config.seed).spawn(4)
    rng_items, rng_text, rng_users, rng_inter = (np.random.default_rng(s) for s in seeds)
    logger.info("synth: %d users, %d items, %d interactions, %d topics (seed %d)",
                config.num_users, config.num_items, config.num_interactions,
                config.num_topics, config.seed)
    items = _items(config, rng_items)
    texts = _item_texts(config, items, rng_text)
    users = _users(config, rng_users)
    inter = _interactions(config, items, users, rng_inter)
    bias = float(inter.pop("click_bias"))
    topics = TOPICS[: config.num_topics]
    with DatasetWriter(
        out_dir, config.name, scenarios=SCENARIOS, actions=ACTIONS,
        user_attrs={"attr_age_group": len(AGE_GROUPS), "attr_region": len(REGIONS)},
        source={"generator": "torchrec_mm.data.synth", "config": dataclasses.asdict(config),
                "topics": [t for t, _ in topics], "click_bias": bias,
                "user_attr_values": {"attr_age_group": AGE_GROUPS, "attr_region": REGIONS}},
        overwrite=overwrite, rows_per_part=max(config.num_interactions, 1),
    ) as w:
        w.add_interactions(inter)
        w.set_items({"raw_id": np.char.add("item", np.arange(config.num_items).astype(str)),
                     "text": texts})
        w.set_users({"raw_id": np.char.add("user", np.arange(config.num_users).astype(str)),
                     "attr_age_group": users["age"], "attr_region": users["region"]})
        SynthTruth(
            item_topic=items["topic"].astype(np.int64),
            item_topic2=items["topic2"].astype(np.int64),
            item_topic_mix=items["mix"].astype(np.float32),
            item_quality=items["quality"].astype(np.float32),
            item_popularity=items["pop"].astype(np.float32),
            user_interest=users["interest"].astype(np.float32),
            user_intent_topic=users["intent"].astype(np.int64),
            user_intent_start=users["intent_start"].astype(np.int64),
            user_age_group=users["age"].astype(np.int64),
            user_region=users["region"].astype(np.int64),
            topic_names=[t for t, _ in topics],
            topic_words=[list(ws) for _, ws in topics],
        ).save(w.path(TRUTH_FILE))
    assert w.meta is not None
    return w.meta


def affinity(truth: SynthTruth, user: np.ndarray, item: np.ndarray) -> np.ndarray:
    """The planted interest affinity ``theta_i . pi_u / max(pi_u)`` [n] of pairs."""
    pi = truth.user_interest
    return (pi[user] * truth.item_topic_mix[item]).sum(1) / pi.max(1)[user]


__all__ = ["SynthConfig", "SynthTruth", "generate", "affinity", "TOPICS", "MAX_TOPICS",
           "TRUTH_FILE", "SCENARIOS", "ACTIONS"]
