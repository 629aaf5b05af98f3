"""Write the example prompt datasets used by the jobs in jobs/ (run from anywhere):

    python jobs/data/make_prompts.py

* demo_prompts.parquet: brainstorming and creative-writing prompts as plain text
  (columns id, prompt, category), for jobs/demo.yaml and jobs/temperature_sweep.yaml;
* brainstorm_chat.parquet: the same kind of tasks as chat messages with a system prompt
  (columns id, messages, topic), for jobs/brainstorm.yaml and jobs/gpu_cluster.yaml.

The prompts were written for this project. Output is deterministic (same bytes every run apart
from Parquet's writer metadata), with small row groups so that shards follow row groups.
"""

from __future__ import annotations

import pathlib

import pyarrow as pa
import pyarrow.parquet as pq

HERE = pathlib.Path(__file__).resolve().parent

# (category, prompt)
DEMO_PROMPTS = [
    ("brainstorm", "List five unusual uses for a paperclip on a long train journey."),
    ("brainstorm", "Suggest names for a bakery run by retired astronauts."),
    ("brainstorm", "Give me three ideas for a board game about bees running a city."),
    ("brainstorm", "What could a small town do with an abandoned railway station?"),
    ("brainstorm", "Brainstorm ways to make a rainy Sunday afternoon memorable for two kids."),
    ("brainstorm", "Invent three holidays that do not exist yet and say how to celebrate them."),
    ("brainstorm", "Propose four weekend projects that use only cardboard and tape."),
    ("brainstorm", "Name six possible careers for a dragon living in the modern world."),
    ("brainstorm", "What are some fun questions to ask at a dinner with strangers?"),
    ("brainstorm", "Think of ways a library could attract teenagers on Friday nights."),
    ("brainstorm", "Suggest titles for a podcast about the history of everyday objects."),
    ("brainstorm", "List surprising things you could learn from watching ants for an hour."),
    ("story", "Write the opening lines of a story about a lighthouse keeper who receives a letter from the sea."),
    ("story", "Tell a short story about a robot that is afraid of the dark."),
    ("story", "Begin a mystery set in a museum where the paintings change every night."),
    ("story", "Write a tiny fable about a fox who wanted to be a gardener."),
    ("story", "Describe the first morning on a colony ship that has just reached a new planet."),
    ("story", "Write a story that starts with: The umbrella refused to open."),
    ("story", "Tell the tale of a cat who runs a secret post office at night."),
    ("story", "Write a scene where two old friends meet again at a bus stop in the snow."),
    ("poem", "Write a short poem about the smell of rain on hot stones."),
    ("poem", "Compose a haiku about a kettle coming to the boil."),
    ("poem", "Write four lines about the moon as seen by a sleepy owl."),
    ("poem", "Write a cheerful poem about Monday mornings."),
    ("poem", "Write a limerick about a cow who learned to play the violin."),
    ("poem", "Write a poem in which the ocean apologizes to the shore."),
    ("world", "Describe a city built entirely on the backs of giant turtles."),
    ("world", "Invent a new sport played in zero gravity and explain its rules."),
    ("world", "Describe the market of a village where people trade memories instead of coins."),
    ("world", "What would a restaurant for ghosts serve, and how would it be decorated?"),
    ("world", "Describe a forest where the trees whisper the weather forecast."),
    ("dialogue", "Write a conversation between a teapot and a coffee machine arguing about mornings."),
    ("dialogue", "Write a dialogue in which a pirate asks a librarian for help finding a map."),
    ("dialogue", "A detective interviews a very nervous houseplant. Write the scene."),
    ("letter", "Write a thank-you note from a mountain to the hikers who kept its trails clean."),
    ("letter", "Write a postcard from a snail on its first holiday abroad."),
]

# (topic, system, user)
SYSTEM = "You are a creative partner. Give varied, concrete and surprising ideas. Keep answers short."
CHAT_PROMPTS = [
    ("product", SYSTEM, "Brainstorm names for an app that reminds people to water their plants."),
    ("product", SYSTEM, "Give me ideas for a reusable lunch box that kids would actually want to use."),
    ("product", SYSTEM, "What features would make an alarm clock feel kind rather than annoying?"),
    ("product", SYSTEM, "Suggest ways a bicycle could be more useful in a city with lots of hills."),
    ("event", SYSTEM, "Plan a themed birthday party for someone who loves maps."),
    ("event", SYSTEM, "Suggest activities for a neighbourhood festival on a tiny budget."),
    ("event", SYSTEM, "How could a school run a science fair that feels like an adventure?"),
    ("event", SYSTEM, "Give ideas for a picnic where every dish is a different colour."),
    ("writing", SYSTEM, "Give me five first lines for a novel set on a floating island."),
    ("writing", SYSTEM, "Suggest plot twists for a story about a village baker who is secretly a wizard."),
    ("writing", SYSTEM, "Invent three characters who live in a clock tower and describe their quirks."),
    ("writing", SYSTEM, "Propose titles for a collection of poems about winter light."),
    ("writing", SYSTEM, "Suggest settings for a ghost story that are not houses."),
    ("writing", SYSTEM, "Give me ideas for a children's book about a shy cloud."),
    ("learning", SYSTEM, "Suggest playful ways to learn the names of the planets."),
    ("learning", SYSTEM, "How could someone practise a new language while cooking dinner?"),
    ("learning", SYSTEM, "Give ideas for explaining fractions with food."),
    ("learning", SYSTEM, "Invent a memory game for remembering the colours of the rainbow."),
    ("home", SYSTEM, "Ideas for turning a small balcony into a place to relax."),
    ("home", SYSTEM, "How can I make a tiny kitchen feel less cluttered?"),
    ("home", SYSTEM, "Suggest cosy reading corners that can be built in a weekend."),
    ("home", SYSTEM, "What can be done with a pile of old jars?"),
    ("travel", SYSTEM, "Plan a day in a city you have never visited, using only a paper map."),
    ("travel", SYSTEM, "Suggest games to play on a long car ride with no screens."),
    ("travel", SYSTEM, "What would be a memorable way to spend a night in a small mountain hut?"),
    ("travel", SYSTEM, "Give ideas for a walking tour of your own street."),
    ("food", SYSTEM, "Invent three sandwiches named after famous rivers."),
    ("food", SYSTEM, "Suggest breakfast ideas that feel like a celebration."),
    ("food", SYSTEM, "What could a soup festival serve to surprise its visitors?"),
    ("food", SYSTEM, "Give me ideas for desserts inspired by the four seasons."),
]


def demo_table() -> pa.Table:
    return pa.table(
        {
            "id": [f"demo-{i:03d}" for i in range(len(DEMO_PROMPTS))],
            "prompt": [p for _, p in DEMO_PROMPTS],
            "category": [c for c, _ in DEMO_PROMPTS],
        }
    )


def chat_table() -> pa.Table:
    messages = [
        [{"role": "system", "content": system}, {"role": "user", "content": user}] for _, system, user in CHAT_PROMPTS
    ]
    message_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    return pa.table(
        {
            "id": pa.array([f"chat-{i:03d}" for i in range(len(CHAT_PROMPTS))], pa.string()),
            "messages": pa.array(messages, message_type),
            "topic": pa.array([t for t, _, _ in CHAT_PROMPTS], pa.string()),
        }
    )


def main() -> None:
    pq.write_table(demo_table(), HERE / "demo_prompts.parquet", row_group_size=12)
    pq.write_table(chat_table(), HERE / "brainstorm_chat.parquet", row_group_size=10)
    print(f"wrote {HERE / 'demo_prompts.parquet'} ({len(DEMO_PROMPTS)} prompts)")
    print(f"wrote {HERE / 'brainstorm_chat.parquet'} ({len(CHAT_PROMPTS)} prompts)")


if __name__ == "__main__":
    main()
