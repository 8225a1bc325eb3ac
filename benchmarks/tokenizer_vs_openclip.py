"""Captions per second of clip_core's tokenizer against OpenCLIP's SimpleTokenizer on the same seeded list of
alt-text-like captions, in one process, checking that both give identical ids.

    .venv/bin/python benchmarks/tokenizer_vs_openclip.py --n 100000 --threads 1 --json benchmarks/out/tokenizer.json
"""

import argparse
import json
import os
import platform
import random
import time
import unicodedata
from collections import Counter
from pathlib import Path

import ftfy
import open_clip
import torch
from open_clip.tokenizer import SimpleTokenizer

from clip_core.tokenizer import ClipTokenizer


def word_list(text: str) -> list[str]:
    return text.split()


NOUNS = word_list("""dog cat puppy kitten horse bird eagle fish shark whale car truck bike motorcycle bus train plane boat ship
house home kitchen bedroom bathroom living room garden yard pool beach ocean sea lake river mountain forest tree
flower rose tulip sunflower grass field farm city street road bridge building tower skyline church castle park
woman man girl boy baby child family couple bride groom wedding party birthday cake cookie pizza burger salad
coffee tea wine beer cocktail bottle glass cup mug plate bowl table chair sofa couch bed lamp mirror rug curtain
dress shirt t-shirt jacket coat jeans pants shorts skirt shoes sneakers boots hat cap bag backpack wallet watch
ring necklace earrings bracelet sunglasses phone laptop computer keyboard camera headphones tv screen monitor
book notebook pen pencil poster print painting canvas illustration vector icon logo pattern background texture
wallpaper frame sign card invitation sticker decal mug toy doll game puzzle ball guitar piano drum ticket map
snow rain sunset sunrise sky cloud moon star light fire water ice stone rock sand wood metal paper leather gold
silver diamond glass plastic cotton wool silk portrait landscape closeup view detail set collection kit pack""")
ADJECTIVES = word_list("""red blue green yellow black white pink purple orange brown gray grey beige navy dark light bright
vintage retro modern classic antique rustic elegant cute funny happy beautiful pretty gorgeous stunning luxury
cheap new old small large big tiny huge little long short tall round square wooden handmade custom personalized
organic fresh hot cold warm cozy soft hard heavy free best top cool amazing awesome simple minimalist abstract
floral striped plaid leather waterproof wireless portable digital summer winter spring autumn fall christmas
halloween easter wedding baby mens womens kids unisex""")
FUNCTION_WORDS = word_list("""a a a the the the of of in in on on with with and and for for to at by from is are this
that your our my his her their over under near into out up""")
PLACES = [
    "New York", "London", "Paris", "Tokyo", "Los Angeles", "San Francisco", "Chicago", "Berlin", "Rome", "Sydney",
    "Toronto", "Barcelona", "Amsterdam", "Dubai", "Singapore", "Hong Kong", "Miami", "Seattle", "Boston", "Texas",
    "California", "Florida", "Italy", "Spain", "Germany", "France", "Japan", "India", "Brazil", "Mexico", "Canada",
    "Australia", "Scotland", "Ireland",
]  # fmt: skip
BRANDS = word_list(
    "Nike Adidas Apple Samsung IKEA Canon Sony Lego Disney Marvel Toyota Ford BMW Etsy Amazon Zara"
)
BRANDS_WITH_AMPERSAND = ["H&M", "AT&T", "M&M's", "Q&A", "R&B", "Tom & Jerry", "B&W", "P&G"]
SUFFIXES = [
    "- Stock Photo", "| Etsy", "Royalty Free Stock Image", "stock illustration", "Vector Illustration",
    "on white background", "HD wallpaper", "for sale", "Free Shipping", "- YouTube", "| Pinterest", "(Photo)",
    "- Image", "isolated on white", "High Resolution", "Clipart",
]  # fmt: skip
ENTITIES = ["&amp;", "&quot;", "&#39;", "&nbsp;", "&eacute;", "&#8217;", "&rsquo;", "&ndash;", "&lt;3", "&amp;amp;",
            "&gt;", "&hellip;", "&copy;", "&reg;", "&trade;", "&#x27;"]  # fmt: skip
LATIN_WORDS = ["café", "naïve", "résumé", "Pokémon", "jalapeño", "crème brûlée", "Zürich", "São Paulo", "Ångström",
               "Björk", "façade", "Mädchen", "niño", "señora", "Łódź", "Kraków", "Málaga", "Genève", "Straße"]  # fmt: skip
TYPOGRAPHY = ["’s", "’", "“", "”", "–", "—", "…", "®", "™", "©", "°", "×", "½", "•", "€", "£", "«", "»", "\xa0"]  # fmt: skip
EMOJI = ["😀", "😍", "❤️", "👍", "🔥", "✨", "🎉", "🌸", "🐶", "👍🏽", "👩‍👩‍👧", "🏳️‍🌈", "🇺🇸", "🇯🇵", "☀️", "⭐", "💯", "🎄"]  # fmt: skip
SCRIPT_WORDS = {
    "zh": ["北京", "猫", "咖啡", "新款", "女装", "夏季", "高清", "壁纸", "图片", "风景"],
    "ja": ["東京", "ねこ", "カフェ", "かわいい", "写真", "イラスト", "桜", "夏"],
    "ko": ["서울", "고양이", "커피", "사진", "여름", "풍경"],
    "ru": ["Москва", "кошка", "кофе", "фото", "лето", "красивый", "платье"],
    "ar": ["القاهرة", "قطة", "قهوة", "صورة", "صيف"],
    "hi": ["दिल्ली", "बिल्ली", "कॉफ़ी", "तस्वीर"],
    "el": ["Αθήνα", "γάτα", "καφές", "φωτογραφία"],
    "th": ["กรุงเทพ", "แมว", "กาแฟ", "ภาพ"],
    "he": ["ירושלים", "חתול", "קפה"],
}
MESSY = [
    "\n",
    "\t",
    "  ",
    "\r\n",
    "\u200b",
    "\x0b",
    "\ufeff",
    "Ã©",
    "â€™",
    "Ã¼",
    "ＦＵＬＬ",
    "ﬁ",
    "\x1b[1m",
    "\u2028",
]


def random_word(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.38:
        return rng.choice(NOUNS)
    if r < 0.56:
        return rng.choice(ADJECTIVES)
    if r < 0.80:
        return rng.choice(FUNCTION_WORDS)
    if r < 0.86:
        return rng.choice(["2019", "2020", "2021", "2022", "2023", "10", "3", "100", "1", "$19.99", "50%", "12x18",
                           "4K", "1080p", "8", "XL", "3D", "No.5", "#1", "24\"", "5'", "15cm", "2pcs"])  # fmt: skip
    if r < 0.90:  # model numbers, file names, SKUs: mostly seen once
        stem = "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ0123456789") for _ in range(rng.randint(3, 10)))
        return rng.choice(
            [stem, f"IMG_{rng.randint(1000, 9999)}", f"{stem}-{rng.randint(1, 999)}", f"{stem.lower()}.jpg"]
        )
    if r < 0.95:
        return rng.choice(PLACES)
    if r < 0.999:
        return rng.choice(BRANDS)
    return rng.choice(BRANDS_WITH_AMPERSAND)


def random_caption(rng: random.Random) -> tuple[str, str]:
    """An alt-text-like caption and the kind of text it holds."""
    n_words = rng.randint(100, 300) if rng.random() < 0.02 else rng.randint(5, 40)
    words = [random_word(rng) for _ in range(n_words)]
    if rng.random() < 0.3:
        words = [w.capitalize() for w in words]
    for i in range(len(words)):
        if rng.random() < 0.08:
            words[i] += rng.choice([",", ",", ".", "!", "?", ":", ";", "...", ")", " -", " |", " /"])
    kind = "ascii"
    r = rng.random()
    if r < 0.06:
        kind = "html entities"
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(ENTITIES))
    elif r < 0.14:
        kind = "latin/typography"
        for _ in range(rng.randint(1, 3)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(LATIN_WORDS + TYPOGRAPHY))
    elif r < 0.19:
        kind = "emoji"
        for _ in range(rng.randint(1, 3)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(EMOJI))
    elif r < 0.24:
        kind = "other scripts"
        script = SCRIPT_WORDS[rng.choice(list(SCRIPT_WORDS))]
        for _ in range(rng.randint(1, 8)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(script))
    elif r < 0.26:
        kind = "messy"
        for _ in range(rng.randint(1, 3)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(MESSY))
        if rng.random() < 0.3:
            words = [unicodedata.normalize("NFD", w) for w in words]
    caption = " ".join(words)
    if rng.random() < 0.15:
        caption += " " + rng.choice(SUFFIXES)
    if "&" in caption and kind == "ascii":
        kind = "ascii with &"
    return caption, kind


def make_captions(n: int, seed: int) -> tuple[list[str], Counter]:
    rng = random.Random(seed)
    captions, kinds = [], Counter()
    for _ in range(n):
        caption, kind = random_caption(rng)
        captions.append(caption)
        kinds[kind] += 1
    return captions, kinds


def timed_pass(tokenizers: dict, captions: list[str], block: int = 5000) -> tuple[dict, dict]:
    """One pass of every tokenizer over all captions, alternating between them block by block so that load
    from other processes on a shared machine hits them alike. Returns (ids, seconds) per tokenizer."""
    ids = {name: [] for name in tokenizers}
    seconds = dict.fromkeys(tokenizers, 0.0)
    for start in range(0, len(captions), block):
        for name, tokenizer in tokenizers.items():
            begin = time.perf_counter()
            ids[name].append(tokenizer(captions[start : start + block]))
            seconds[name] += time.perf_counter() - begin
    return {name: torch.cat(blocks) for name, blocks in ids.items()}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="number of captions")
    parser.add_argument("--threads", type=int, default=1, help="threads for clip_core's tokenizer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(1)

    captions, kinds = make_captions(args.n, args.seed)
    n = len(captions)
    tokenizers = {"openclip": SimpleTokenizer(), "clip_core": ClipTokenizer(num_threads=args.threads)}
    # first pass: both start with empty caches; second pass: both caches hold every word of the list
    ids, cold_seconds = timed_pass(tokenizers, captions)
    _, warm_seconds = timed_pass(tokenizers, captions)
    differing = int((ids["clip_core"] != ids["openclip"]).any(dim=1).sum())
    passes = {}
    for name, seconds in [("cold", cold_seconds), ("warm", warm_seconds)]:
        passes[name] = {
            "openclip_captions_per_s": n / seconds["openclip"],
            "clip_core_captions_per_s": n / seconds["clip_core"],
            "speedup": seconds["openclip"] / seconds["clip_core"],
        }

    kinds_text = ", ".join(f"{kind} {count / n:.1%}" for kind, count in kinds.most_common())
    print(f"{n} captions (seed {args.seed}); kinds: {kinds_text}")
    print(f"ids identical: {differing == 0} ({differing} captions differ)\n")
    print(
        f"| caches | OpenCLIP SimpleTokenizer | clip_core ClipTokenizer ({args.threads} thread) | speed-up |"
    )
    print("|---|---:|---:|---:|")
    for name, result in passes.items():
        print(
            f"| {name} | {result['openclip_captions_per_s']:,.0f} captions/s "
            f"| {result['clip_core_captions_per_s']:,.0f} captions/s | {result['speedup']:.1f}x |"
        )

    if args.json:
        report = {
            "n_captions": n,
            "seed": args.seed,
            "threads": args.threads,
            "caption_kinds": dict(kinds),
            "identical_ids": differing == 0,
            "captions_differing": differing,
            **passes,
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "open_clip": open_clip.__version__,
                "ftfy": ftfy.__version__,
            },
            "cpu_count": os.cpu_count(),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if differing:
        raise SystemExit(f"{differing} captions got different ids from OpenCLIP")


if __name__ == "__main__":
    main()
