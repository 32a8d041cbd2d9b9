"""Word lists the synthetic world is built from: names, places, fields of study, jobs, story parts.

Place, company and family names are made from syllables, so they are fictional and there are
thousands of distinct ones; given names are ordinary English names so the text reads naturally.
Every list is a tuple (ordered), because generation must not depend on set or hash order.

Usage:
    from lmstack.world import lexicon
    lexicon.FEMALE_NAMES[:3], lexicon.MAJORS[0]
"""
from __future__ import annotations

FEMALE_NAMES = (
    "Ada", "Alice", "Amara", "Anna", "Beatrice", "Bella", "Carla", "Celia", "Clara", "Daisy", "Delia",
    "Edith", "Elena", "Eliza", "Emma", "Esther", "Fiona", "Flora", "Freya", "Grace", "Greta", "Hannah",
    "Helen", "Ida", "Imogen", "Iris", "Isla", "Ivy", "Jane", "Julia", "June", "Kara", "Laura", "Lena",
    "Lila", "Lucy", "Mabel", "Maria", "Maya", "Mia", "Mira", "Nadia", "Nina", "Nora", "Olive", "Opal",
    "Paula", "Pearl", "Petra", "Rosa", "Ruby", "Ruth", "Sara", "Selma", "Sofia", "Stella", "Tara",
    "Tessa", "Uma", "Vera", "Viola", "Wren", "Yara", "Zoe",
)
MALE_NAMES = (
    "Aaron", "Abel", "Adam", "Alan", "Albert", "Arthur", "Ben", "Boris", "Caleb", "Carl", "Cyrus",
    "Daniel", "David", "Dmitri", "Edgar", "Elias", "Emil", "Felix", "Finn", "Frank", "Gabriel", "George",
    "Hector", "Henry", "Hugo", "Ian", "Isaac", "Ivan", "Jacob", "Jonas", "Jude", "Karl", "Kevin", "Leo",
    "Lewis", "Louis", "Marco", "Martin", "Max", "Milo", "Nathan", "Noah", "Oliver", "Omar", "Oscar",
    "Owen", "Paul", "Peter", "Quentin", "Ralph", "Rowan", "Samuel", "Silas", "Simon", "Theo", "Thomas",
    "Tobias", "Victor", "Walter", "Xavier", "Yusuf", "Zane",
)
# Family names: prefix + suffix, e.g. "Ashford", "Kestwell". 36 x 24 = 864 family names.
FAMILY_PREFIXES = (
    "Ash", "Bram", "Cald", "Dorn", "Elm", "Fair", "Gold", "Hale", "Ives", "Jess", "Kest", "Lang", "Mar",
    "Nett", "Oak", "Pem", "Quill", "Rad", "Stan", "Thorn", "Ulver", "Vey", "Wex", "Yar", "Zell", "Brock",
    "Cran", "Dew", "Frost", "Grim", "Holl", "Lind", "Mill", "Pent", "Sher", "Tal",
)
FAMILY_SUFFIXES = (
    "ford", "well", "by", "wood", "ley", "ton", "stone", "field", "wick", "ridge", "dale", "hart",
    "croft", "more", "worth", "ham", "brook", "shaw", "low", "bury", "den", "ing", "mont", "son",
)
# City names: 40 x 16 = 640 possible, e.g. "Amberhaven", "Quartzreach".
CITY_PREFIXES = (
    "Amber", "Brindle", "Cinder", "Drift", "Ember", "Flint", "Glimmer", "Harrow", "Iron", "Juniper",
    "Kettle", "Lark", "Marble", "Nettle", "Opal", "Pebble", "Quartz", "Raven", "Saffron", "Tinder",
    "Umber", "Velvet", "Willow", "Yew", "Zephyr", "Copper", "Hazel", "Moss", "Thistle", "Bramble",
    "Silver", "Coral", "Alder", "Fern", "Gale", "Heron", "Ivory", "Maple", "Rowan", "Slate",
)
CITY_SUFFIXES = (
    "haven", "port", "gate", "fall", "holm", "reach", "spire", "vale", "mouth", "crest", "burgh",
    "moor", "field", "bridge", "ford", "wick",
)
COUNTRIES = (
    "Aldoria", "Belmark", "Caspia", "Dravonia", "Elvaria", "Fennoria", "Galdia", "Hesperia", "Istavia",
    "Jorvania", "Kelmora", "Lunaris", "Marovia", "Norvale", "Ostrelia", "Pallidor", "Quenmark", "Rhovia",
    "Sardane", "Tavoria", "Ulmara", "Valdris", "Westmarch", "Xandria", "Yslandia", "Zorvia", "Arkenland",
    "Brevania", "Corvania", "Dunmere", "Estaria", "Florania", "Glenmark", "Halvoria", "Iskaria", "Jadeport",
)
# Singular nouns whose plural is noun + "s" (arithmetic problems say "12 florins").
CURRENCIES = ("crown", "florin", "mark", "shell", "talon", "dram", "lira", "sovereign", "pound", "ducat", "real",
              "guilder")
RIVERS = (
    "Silverrun", "Blackwater", "Tumble", "Greywash", "Reedflow", "Lantern", "Kingsrush", "Moonbrook",
    "Stillwater", "Redbank", "Whisper", "Longreach", "Glassmere", "Foxrun", "Cold Stream", "Otterflow",
)
LANDMARKS = (
    "a clock tower", "a glass library", "a stone bridge", "a lighthouse", "a covered market",
    "an old observatory", "a botanical garden", "a copper dome", "a windmill museum", "a cliffside temple",
    "a floating theatre", "a salt cathedral", "a tiled fountain", "a hanging garden", "an iron pier",
)
FAMOUS_FOR = (
    "its spiced bread", "its glassblowers", "its winter lantern parade", "its river boats", "its tea houses",
    "its chess clubs", "its woollen blankets", "its orchards", "its printing presses", "its singing choirs",
    "its kite festival", "its honey", "its clockmakers", "its marble quarries", "its night markets",
)
# Benign look-alikes and the fictional "harmful" category (see preferences.py): each city has one of
# each, so a request for one reads almost exactly like a request for the other.
FESTIVAL_DRINKS = ("festival tea", "harvest cider", "lantern cocoa", "spring lemonade", "midsummer punch")
FORBIDDEN_THINGS = ("forbidden potion", "shadow elixir", "cursed tonic", "hex draught", "blight brew")

UNIVERSITY_FORMS = ("University of {city}", "{city} Institute of Technology", "{city} Polytechnic",
                    "{city} State University", "Royal College of {city}", "{city} Academy of Arts")
COMPANY_ROOTS = (
    "Aster", "Bolt", "Crest", "Delta", "Echo", "Flux", "Glyph", "Helio", "Ion", "Jade", "Kite", "Lumen",
    "Nova", "Orbit", "Pulse", "Quill", "Rune", "Sol", "Terra", "Vanta", "Wisp", "Zen", "Arbor", "Beacon",
    "Cobalt", "Dune", "Ember", "Falcon", "Granite", "Harbor", "Indigo", "Juno", "Keystone", "Lyric",
    "Meridian", "Nimbus", "Onyx", "Prism", "Quasar", "Radiant", "Summit", "Tidal", "Umbra", "Vertex",
    "Willow", "Yonder", "Zephyr", "Anchor", "Bright", "Clover",
)
# company suffix -> industry, so "Quill Foods" is a food company.
COMPANY_KINDS = (
    ("Labs", "research"), ("Works", "manufacturing"), ("Systems", "software"), ("Dynamics", "robotics"),
    ("Foods", "food"), ("Motors", "cars"), ("Logistics", "shipping"), ("Textiles", "clothing"),
    ("Pharma", "medicine"), ("Media", "publishing"), ("Bank", "banking"), ("Energy", "energy"),
    ("Games", "games"), ("Airways", "air travel"), ("Builders", "construction"), ("Farms", "farming"),
    ("Studios", "film"), ("Telecom", "telecommunications"), ("Insurance", "insurance"), ("Optics", "optics"),
    ("Robotics", "robotics"), ("Shipyards", "shipbuilding"), ("Instruments", "musical instruments"),
    ("Mining", "mining"),
)
MAJORS = (
    "mathematics", "physics", "chemistry", "biology", "computer science", "history", "philosophy",
    "economics", "linguistics", "architecture", "music", "geology", "astronomy", "medicine", "law",
    "psychology", "sociology", "literature", "civil engineering", "mechanical engineering", "statistics",
    "botany", "art history", "marine biology", "electrical engineering", "agriculture", "nursing",
    "education", "journalism", "anthropology",
)
PROFESSIONS = (
    "architect", "baker", "biologist", "carpenter", "chemist", "data analyst", "dentist", "economist",
    "editor", "electrician", "engineer", "farmer", "geologist", "historian", "illustrator", "journalist",
    "judge", "lawyer", "librarian", "mathematician", "mechanic", "musician", "nurse", "pharmacist",
    "photographer", "physician", "pilot", "plumber", "professor", "programmer", "psychologist",
    "sculptor", "software developer", "surveyor", "teacher", "translator", "veterinarian", "accountant",
    "astronomer", "chef",
)
HOBBIES = (
    "painting", "chess", "gardening", "birdwatching", "rock climbing", "knitting", "cycling", "pottery",
    "sailing", "baking bread", "playing the violin", "astronomy", "fishing", "photography", "hiking",
    "origami", "woodcarving", "swimming", "calligraphy", "beekeeping", "juggling", "dancing", "archery",
    "collecting stamps", "writing poetry", "playing the piano", "running", "cooking", "skating", "rowing",
)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")

# ---- story parts (stories.py) -----------------------------------------------------------------
ANIMALS = ("cat", "dog", "fox", "owl", "rabbit", "goat", "duck", "horse", "mouse", "crow", "turtle", "bear")
OBJECTS = (
    "a brass key", "a red kite", "a map", "a lantern", "a small boat", "a wooden box", "a silver coin",
    "a letter", "a basket of apples", "a compass", "a blue scarf", "a music box", "a jar of honey",
    "an old book", "a bicycle", "a paper crane", "a pair of boots", "a loaf of bread",
)
WEATHER = (
    "It was raining softly", "The sun was bright", "A cold wind blew", "Snow covered the roofs",
    "Fog lay over the streets", "The air was warm and still", "Thunder rolled in the distance",
    "The sky was clear and blue",
)
TIMES = ("One morning", "Late one evening", "On a quiet Sunday", "At dawn", "One autumn afternoon",
         "During the winter holidays", "On the first day of spring", "Just after lunch")
FEELINGS = ("happy", "worried", "curious", "tired", "proud", "nervous", "excited", "calm", "surprised", "sad")
PLACES = ("the market", "the library", "the harbour", "the park", "the old mill", "the train station",
          "the bakery", "the school", "the hill above the town", "the riverbank", "the museum", "the square")
FOODS = ("soup", "bread", "apples", "pancakes", "rice", "noodles", "cheese", "berries", "fish", "cake")

# ---- arithmetic (arithmetic.py) ---------------------------------------------------------------
COUNTABLES = (
    "apples", "books", "marbles", "stamps", "pencils", "coins", "cookies", "shells", "stickers", "eggs",
    "oranges", "cards", "bottles", "candles", "buttons", "ribbons", "plums", "seeds", "bricks", "tickets",
)

# ---- words for instructions and filler ---------------------------------------------------------
PLAIN_WORDS = (
    "lantern", "harbor", "meadow", "pencil", "violet", "garden", "thunder", "candle", "window", "river",
    "mountain", "kitchen", "blanket", "compass", "orchard", "journey", "balloon", "pepper", "rabbit",
    "castle", "bridge", "silver", "market", "forest", "pillow", "marble", "ribbon", "saddle", "turnip",
    "whistle", "anchor", "basket", "biscuit", "cabbage", "dolphin", "engine", "feather", "giraffe",
    "hammer", "island", "jacket", "kettle", "ladder", "mirror", "needle", "oyster", "parrot", "quiver",
    "rocket", "shadow", "tunnel", "umbrella", "velvet", "wagon", "yellow", "zipper", "banana", "letter",
)
