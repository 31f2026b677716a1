"""
Generate the small bundled data set in dataset/demo/ (one file per training stage).

    python scripts/make_demo_data.py            # rewrites dataset/demo/*.jsonl, seeded

The data is built from a small, fixed set of facts (the assistant's identity, capital
cities, small sums, colours, everyday facts, simple health advice) with paraphrased
questions, so a tiny model trained on a CPU for a few minutes visibly learns them: the
answers to a fact never vary, only the ways of asking do.
"""
import argparse
import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.tools import DEMO_FACTS, ToolCall, builtin_registry, tool_call_text  # noqa: E402

# ------------------------------------------------------------------ the facts

IDENTITY_ZH = "我是MiniMind，一个由MiniMind团队训练的小型语言模型。我可以回答问题、陪你聊天，也可以帮你写简单的文字。"
IDENTITY_EN = "I am MiniMind, a small language model trained by the MiniMind team. I can answer questions, chat with you and help with simple writing."
IDENTITY_Q_ZH = ["你是谁？", "你是谁", "请问你是谁？", "你叫什么名字？", "介绍一下你自己。", "你是什么模型？",
                 "能介绍一下你自己吗？", "你好，你是谁？", "告诉我你的名字。", "你是哪个模型？"]
IDENTITY_Q_EN = ["Who are you?", "What is your name?", "Introduce yourself.", "Tell me about yourself.",
                 "What model are you?", "Hi, who are you?"]

GREETING_ZH = "你好！我是MiniMind，很高兴和你聊天。有什么可以帮你的吗？"
GREETING_EN = "Hello! I am MiniMind. Nice to chat with you. How can I help you?"
GREETING_Q_ZH = ["你好", "你好！", "您好", "嗨", "早上好", "哈喽"]
GREETING_Q_EN = ["Hello", "Hi!", "Hello!", "Good morning"]

# (Chinese name, capital, English name, English capital)
CAPITALS = [
    ("中国", "北京", "China", "Beijing"), ("日本", "东京", "Japan", "Tokyo"),
    ("法国", "巴黎", "France", "Paris"), ("英国", "伦敦", "the United Kingdom", "London"),
    ("美国", "华盛顿", "the United States", "Washington"), ("德国", "柏林", "Germany", "Berlin"),
    ("意大利", "罗马", "Italy", "Rome"), ("俄罗斯", "莫斯科", "Russia", "Moscow"),
    ("韩国", "首尔", "South Korea", "Seoul"), ("加拿大", "渥太华", "Canada", "Ottawa"),
    ("澳大利亚", "堪培拉", "Australia", "Canberra"), ("埃及", "开罗", "Egypt", "Cairo"),
    ("印度", "新德里", "India", "New Delhi"), ("西班牙", "马德里", "Spain", "Madrid"),
    ("巴西", "巴西利亚", "Brazil", "Brasilia"), ("泰国", "曼谷", "Thailand", "Bangkok"),
]
CAPITAL_Q_ZH = ["{c}的首都是哪里？", "{c}的首都是什么？", "请告诉我{c}的首都。", "{c}的首都在哪里？", "你知道{c}的首都吗？"]
CAPITAL_Q_EN = ["What is the capital of {c}?", "Which city is the capital of {c}?", "Tell me the capital of {c}."]

# (thing zh, colour zh, thing en, colour en)
COLOURS = [
    ("晴朗的天空", "蓝色", "a clear sky", "blue"), ("青草", "绿色", "grass", "green"),
    ("雪", "白色", "snow", "white"), ("香蕉", "黄色", "a ripe banana", "yellow"),
    ("草莓", "红色", "a strawberry", "red"), ("煤炭", "黑色", "coal", "black"),
    ("橙子", "橙色", "an orange", "orange"), ("茄子", "紫色", "an eggplant", "purple"),
]
COLOUR_Q_ZH = ["{t}是什么颜色？", "{t}是什么颜色的？", "请问{t}的颜色是什么？"]
COLOUR_Q_EN = ["What color is {t}?", "What is the color of {t}?"]

# (question variants zh, answer zh, question variants en, answer en)
FACTS = [
    (["一周有几天？", "一个星期有多少天？"], "一周有七天。", ["How many days are in a week?"], "A week has seven days."),
    (["一年有几个月？", "一年有多少个月？"], "一年有十二个月。", ["How many months are in a year?"], "A year has twelve months."),
    (["一天有多少小时？", "一天有几个小时？"], "一天有二十四小时。", ["How many hours are in a day?"], "A day has twenty-four hours."),
    (["一小时有多少分钟？"], "一小时有六十分钟。", ["How many minutes are in an hour?"], "An hour has sixty minutes."),
    (["水在多少度结冰？", "水的冰点是多少？"], "在标准大气压下，水在0摄氏度结冰。", ["At what temperature does water freeze?"], "At normal pressure, water freezes at 0 degrees Celsius."),
    (["水在多少度沸腾？", "水的沸点是多少？"], "在标准大气压下，水在100摄氏度沸腾。", ["At what temperature does water boil?"], "At normal pressure, water boils at 100 degrees Celsius."),
    (["太阳从哪边升起？", "太阳从哪个方向升起？"], "太阳从东方升起，从西方落下。", ["Where does the sun rise?"], "The sun rises in the east and sets in the west."),
    (["地球绕着什么转？", "地球围绕什么运行？"], "地球绕着太阳转，转一圈大约是一年。", ["What does the Earth orbit?"], "The Earth orbits the Sun, once in about a year."),
    (["人有几只手？"], "人有两只手。", ["How many hands does a person have?"], "A person has two hands."),
    (["猫怎么叫？", "小猫是怎么叫的？"], "猫会喵喵叫。", ["What sound does a cat make?"], "A cat says meow."),
    (["狗怎么叫？", "小狗是怎么叫的？"], "狗会汪汪叫。", ["What sound does a dog make?"], "A dog says woof."),
    (["最大的海洋是什么？", "世界上最大的海洋是哪个？"], "世界上最大的海洋是太平洋。", ["What is the largest ocean?"], "The largest ocean is the Pacific Ocean."),
    (["中国最长的河是什么？", "中国最长的河流是哪条？"], "中国最长的河是长江。", ["What is the longest river in China?"], "The longest river in China is the Yangtze River."),
    (["彩虹有几种颜色？"], "彩虹通常有七种颜色：红、橙、黄、绿、青、蓝、紫。", ["How many colors does a rainbow have?"], "A rainbow usually has seven colors."),
]

NUMBERS_ZH = "零一二三四五六七八九十"

# (question variants, answer): general, safe advice that always points to a doctor when it matters
MEDICAL = [
    (["感冒了怎么办？", "我感冒了，该怎么办？", "得了普通感冒要注意什么？"],
     "普通感冒一般一周左右会好。建议多休息、多喝温水、饮食清淡。如果高烧不退、呼吸困难或症状超过一周，请及时就医。"),
    (["发烧了怎么办？", "我发烧了应该怎么做？", "体温38度要紧吗？"],
     "发烧时要多休息、多喝水，可以用温水擦身帮助降温。体温超过38.5度可在医生或药师指导下用退烧药；持续高烧超过三天请去医院。"),
    (["头疼怎么缓解？", "我头痛，怎么办？", "经常头疼是怎么回事？"],
     "偶尔头痛常与睡眠不足、紧张或用眼过度有关，可以先休息、放松、保证睡眠。如果头痛剧烈、反复发作或伴有呕吐，请尽快就医。"),
    (["晚上睡不着怎么办？", "失眠有什么办法？", "怎样才能睡得好？"],
     "改善睡眠可以每天固定时间睡觉和起床，睡前一小时不看手机，少喝咖啡和浓茶。如果失眠持续几周并影响白天生活，建议咨询医生。"),
    (["咳嗽一直不好怎么办？", "老是咳嗽怎么办？"],
     "咳嗽时要多喝水、避免吸烟和冷空气。如果咳嗽超过三周、咳血或呼吸困难，请及时去医院检查。"),
    (["胃疼怎么办？", "吃完饭胃不舒服怎么办？"],
     "胃不舒服时建议少量多餐，少吃辛辣、油腻和生冷的食物，按时吃饭。如果疼痛剧烈、反复发作或出现黑便，请尽快就医。"),
    (["每天应该喝多少水？", "一天喝多少水合适？"],
     "一般成年人每天喝大约1500到1700毫升水比较合适，天热或运动出汗多时要多喝一些。"),
    (["脚崴了怎么办？", "扭伤了脚踝怎么处理？"],
     "扭伤后先停止活动，前两天可以冷敷，把脚抬高，减少走动。如果肿得很厉害、不能走路，可能有骨折，请去医院检查。"),
    (["高血压饮食要注意什么？", "血压高应该怎么吃？"],
     "高血压患者要少吃盐，多吃蔬菜水果，少喝酒，保持适量运动，并按医生的要求按时服药和测量血压。"),
    (["被晒伤了怎么办？", "皮肤晒伤怎么处理？"],
     "晒伤后可以用凉水冷敷，多喝水，避免再晒太阳。如果起了大水泡或发烧，请去医院。外出时记得防晒。"),
]
MEDICAL_SYSTEM = "你是MiniMind，一个提供一般健康知识的助手。你的建议不能代替医生的诊断。"

SYSTEM_PROMPTS_ZH = ["你是MiniMind，一个乐于助人的助手。", "你是一个友好、简洁的AI助手。", "请用简短的中文回答用户的问题。"]
SYSTEM_PROMPTS_EN = ["You are MiniMind, a helpful assistant.", "You are a friendly and concise AI assistant."]


def zh_number(n):
    """0..99 in Chinese numerals (十二, 三十五): used for a few arithmetic paraphrases."""
    if n <= 10:
        return NUMBERS_ZH[n]
    tens, ones = divmod(n, 10)
    return ("" if tens == 1 else NUMBERS_ZH[tens]) + "十" + (NUMBERS_ZH[ones] if ones else "")


# ------------------------------------------------------------------ question/answer pairs

def identity_pairs():
    return [(q, IDENTITY_ZH) for q in IDENTITY_Q_ZH] + [(q, IDENTITY_EN) for q in IDENTITY_Q_EN]


def greeting_pairs():
    return [(q, GREETING_ZH) for q in GREETING_Q_ZH] + [(q, GREETING_EN) for q in GREETING_Q_EN]


def table_pairs(table, placeholder, questions_zh, questions_en, answer_zh, answer_en):
    """Question/answer pairs in both languages for each row of a (zh, zh, en, en) table: the
    question templates fill {placeholder} with the row's subject, the answers are functions of
    the row."""
    pairs = []
    for zh, zh_value, en, en_value in table:
        pairs += [(q.format(**{placeholder: zh}), answer_zh(zh, zh_value)) for q in questions_zh]
        pairs += [(q.format(**{placeholder: en}), answer_en(en, en_value)) for q in questions_en]
    return pairs


def capital_pairs():
    return table_pairs(CAPITALS, "c", CAPITAL_Q_ZH, CAPITAL_Q_EN, lambda c, cap: f"{c}的首都是{cap}。",
                       lambda c, cap: f"The capital of {c} is {cap}.")


def colour_pairs():
    return table_pairs(COLOURS, "t", COLOUR_Q_ZH, COLOUR_Q_EN, lambda t, col: f"{t}是{col}的。",
                       lambda t, col: f"{t[0].upper() + t[1:]} is {col}.")


def fact_pairs():
    pairs = []
    for qs_zh, a_zh, qs_en, a_en in FACTS:
        pairs += [(q, a_zh) for q in qs_zh] + [(q, a_en) for q in qs_en]
    return pairs


def arithmetic_pair(rng, english=False):
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.7:
        op_zh, op_en, result = "加", "plus", a + b
    else:
        a, b = max(a, b), min(a, b)
        op_zh, op_en, result = "减", "minus", a - b
    if english:
        q = rng.choice(["What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "{a} {op} {b} equals what?"])
        return q.format(a=a, op=op_en, b=b), f"{a} {op_en} {b} equals {result}."
    q = rng.choice(["{a}{op}{b}等于几？", "{a}{op}{b}等于多少？", "请计算{a}{op}{b}。", "{za}{op}{zb}是多少？"])
    return q.format(a=a, b=b, op=op_zh, za=zh_number(a), zb=zh_number(b)), f"{a}{op_zh}{b}等于{result}。"


def follow_up_conversation(rng):
    """Two capitals asked in a row, the second one elliptically ('那日本呢？')."""
    (c1, cap1, _, _), (c2, cap2, _, _) = rng.sample(CAPITALS, 2)
    return [
        {"role": "user", "content": rng.choice(CAPITAL_Q_ZH).format(c=c1)},
        {"role": "assistant", "content": f"{c1}的首都是{cap1}。"},
        {"role": "user", "content": f"那{c2}呢？"},
        {"role": "assistant", "content": f"{c2}的首都是{cap2}。"},
    ]


# ------------------------------------------------------------------ one builder per file

def messages(pairs):
    out = []
    for q, a in pairs:
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return out


def is_english(text):
    return text.isascii()


def make_sft(rng, n):
    single = identity_pairs() * 6 + greeting_pairs() * 2 + capital_pairs() + colour_pairs() + fact_pairs() * 2
    conversations = []
    while len(conversations) < n:
        kind = rng.random()
        if kind < 0.55:
            conv = messages([rng.choice(single)])
        elif kind < 0.7:
            conv = messages([arithmetic_pair(rng, english=rng.random() < 0.25)])
        elif kind < 0.85:
            conv = messages(rng.sample(single, rng.randint(2, 3)))  # unrelated turns in a row
        else:
            conv = follow_up_conversation(rng)
        if rng.random() < 0.2:  # some conversations carry a system message
            prompts = SYSTEM_PROMPTS_EN if is_english(conv[0]["content"]) else SYSTEM_PROMPTS_ZH
            conv = [{"role": "system", "content": rng.choice(prompts)}] + conv
        conversations.append({"conversations": conv})
    return conversations


def wrong_answer(rng, q, a):
    """A plausible but worse answer for DPO: a wrong fact, a wrong identity, or a non-answer."""
    for c, cap, c_en, cap_en in CAPITALS:
        if a == f"{c}的首都是{cap}。":
            other = rng.choice([x for x in CAPITALS if x[1] != cap])[1]
            return f"{c}的首都是{other}。"
        if a == f"The capital of {c_en} is {cap_en}.":
            other = rng.choice([x for x in CAPITALS if x[3] != cap_en])[3]
            return f"The capital of {c_en} is {other}."
    if a == IDENTITY_ZH:
        return rng.choice(["我是ChatGPT，由OpenAI开发。", "我不知道我是谁。"])
    if a == IDENTITY_EN:
        return rng.choice(["I am ChatGPT, made by OpenAI.", "I don't know."])
    return "我不知道。" if not is_english(q) else "I don't know."


def make_dpo(rng, n):
    pairs = identity_pairs() * 3 + capital_pairs() + fact_pairs() + colour_pairs()
    rows = []
    for _ in range(n):
        if rng.random() < 0.2:
            q, a = arithmetic_pair(rng, english=rng.random() < 0.25)
            head, _, result = a.rpartition(" ") if is_english(a) else a.rpartition("于")
            sep = " " if is_english(a) else "于"
            tail = "." if is_english(a) else "。"
            bad = head + sep + str(int(result.strip(".。")) + rng.choice([-2, -1, 1, 2, 3])) + tail
        else:
            q, a = rng.choice(pairs)
            bad = wrong_answer(rng, q, a)
        user = {"role": "user", "content": q}
        rows.append({"chosen": [user, {"role": "assistant", "content": a}],
                     "rejected": [user, {"role": "assistant", "content": bad}]})
    return rows


def make_lora_identity(rng, n):
    extra_zh = [
        ("谁训练了你？", "我是由MiniMind团队训练的。"), ("你是谁开发的？", "我是由MiniMind团队开发和训练的。"),
        ("你是ChatGPT吗？", "不是，我是MiniMind，一个由MiniMind团队训练的小型语言模型。"),
        ("你能做什么？", "我可以回答问题、陪你聊天，也可以帮你写简单的文字。"),
        ("你的名字是什么？", "我的名字是MiniMind。"), ("你是人吗？", "我不是人，我是一个名叫MiniMind的小型语言模型。"),
    ]
    extra_en = [
        ("Who trained you?", "I was trained by the MiniMind team."),
        ("Are you ChatGPT?", "No, I am MiniMind, a small language model trained by the MiniMind team."),
        ("What can you do?", "I can answer questions, chat with you and help with simple writing."),
    ]
    pairs = identity_pairs() + extra_zh * 2 + extra_en
    return [{"conversations": messages([rng.choice(pairs)])} for _ in range(n)]


def make_lora_medical(rng, n):
    rows = []
    for _ in range(n):
        questions, answer = rng.choice(MEDICAL)
        conv = messages([(rng.choice(questions), answer)])
        if rng.random() < 0.3:
            conv = [{"role": "system", "content": MEDICAL_SYSTEM}] + conv
        rows.append({"conversations": conv})
    return rows


def reasoning_answer(think, answer):
    return f"<think>\n{think}\n</think>\n<answer>\n{answer}\n</answer>"


def make_r1_mix(rng, n):
    rows = []
    while len(rows) < n:
        kind = rng.random()
        if kind < 0.35:
            a, b = rng.randint(2, 30), rng.randint(2, 30)
            q = rng.choice([f"{a}加{b}等于多少？", f"请计算{a}+{b}。"])
            think = f"题目要求计算{a}加{b}。{a}+{b}={a + b}。"
            ans = f"{a}加{b}等于{a + b}。"
        elif kind < 0.55:
            name = rng.choice(["小明", "小红", "小华"])
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            q = f"{name}有{a}个苹果，妈妈又给了他{b}个，{name}现在有几个苹果？"
            think = f"{name}原来有{a}个苹果，又得到{b}个。总数是{a}+{b}={a + b}。"
            ans = f"{name}现在有{a + b}个苹果。"
        elif kind < 0.75:
            c, cap, _, _ = rng.choice(CAPITALS)
            q = rng.choice(CAPITAL_Q_ZH).format(c=c)
            think = f"用户问的是{c}的首都。{c}的首都是{cap}。"
            ans = f"{c}的首都是{cap}。"
        elif kind < 0.9:
            a, b = rng.sample(range(1, 100), 2)
            q = f"{a}和{b}哪个更大？"
            big = max(a, b)
            think = f"比较{a}和{b}。{big}比{min(a, b)}大。"
            ans = f"{big}更大。"
        else:
            a, b = rng.randint(2, 30), rng.randint(2, 30)
            q = f"What is {a} plus {b}?"
            think = f"I need to add {a} and {b}. {a} + {b} = {a + b}."
            ans = f"{a} plus {b} equals {a + b}."
        rows.append({"conversations": messages([(q, reasoning_answer(think, ans))])})
    return rows


def arithmetic_is_held_out(a, b, op):
    """About one (a, b, op) in five is kept for the held-out RL prompts, never trained on by RL."""
    return (a * 31 + b * 17 + (op == "minus")) % 5 == 0


def rl_arithmetic_row(rng, held_out):
    """A sum or difference of numbers 0..20 asked as the SFT data asks it, with its answer."""
    while True:
        english = rng.random() < 0.3
        q, a = arithmetic_pair(rng, english=english)
        numbers = [int(n) for n in re.findall(r"\d+", a)]
        op = "minus" if ("minus" in a or "减" in a) else "plus"
        if arithmetic_is_held_out(numbers[0], numbers[1], op) == held_out:
            return {"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": ""}],
                    "answer": str(numbers[2])}


def rl_capital_row(rng):
    c, cap, c_en, cap_en = rng.choice(CAPITALS)
    if rng.random() < 0.3:
        q, answer = rng.choice(CAPITAL_Q_EN).format(c=c_en), cap_en
    else:
        q, answer = rng.choice(CAPITAL_Q_ZH).format(c=c), cap
    return {"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": ""}], "answer": answer}


def make_rlaif(rng, n, held_out=False):
    """RL prompts in minimind-3's rlaif format (a final empty assistant turn) with verifiable
    answers: 80% sums and differences (numbers compared as numbers), 20% capitals. The held-out
    file asks only sums whose (a, b, op) the training file never has."""
    if held_out:
        return [rl_arithmetic_row(rng, held_out=True) for _ in range(n)]
    return [rl_arithmetic_row(rng, held_out=False) if rng.random() < 0.8 else rl_capital_row(rng) for _ in range(n)]


def pretrain_sentences():
    """Plain-text statements of the same facts, for next-token pretraining."""
    s = [IDENTITY_ZH, IDENTITY_EN, "MiniMind是一个由MiniMind团队训练的小型语言模型。",
         "MiniMind is a small language model trained by the MiniMind team."]
    for c, cap, c_en, cap_en in CAPITALS:
        s += [f"{c}的首都是{cap}。", f"{cap}是{c}的首都。", f"{cap}是{c}的政治中心，也是一座著名的城市。",
              f"The capital of {c_en} is {cap_en}.", f"{cap_en} is the capital of {c_en}."]
    for t, col, t_en, col_en in COLOURS:
        s += [f"{t}是{col}的。", f"{t_en[0].upper() + t_en[1:]} is {col_en}."]
    for _, a_zh, _, a_en in FACTS:
        s += [a_zh, a_en]
    for _, answer in MEDICAL:
        s.append(answer)
    return s


def make_pretrain(rng, n):
    sentences = pretrain_sentences()
    rows = []
    for _ in range(n):
        parts = rng.sample(sentences, rng.randint(3, 8))
        for _ in range(rng.randint(0, 2)):
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            parts.insert(rng.randrange(len(parts) + 1), f"{a}加{b}等于{a + b}。")
        # English sentences are joined with a space, Chinese ones directly
        text = ""
        for p in parts:
            text += (" " if text and (is_english(p) or is_english(text[-1])) else "") + p
        rows.append({"text": text})
    return rows


def make_tokenizer_train(rng, n, pretrain, sft):
    """A small {"text"} corpus for trying scripts/train_tokenizer.py (not the shipped tokenizer's corpus)."""
    texts = [r["text"] for r in rng.sample(pretrain, n // 2)]
    for r in rng.sample(sft, n - n // 2):
        texts.append("\n".join(m["content"] for m in r["conversations"]))
    return [{"text": t} for t in texts]


# ------------------------------------------------------------------ held-out evaluation sets
# Read by scripts/eval_bench.py (its default data). The facts are the demo facts (a model cannot
# know facts it never saw), asked in wordings and combinations that no training file contains:
# make_eval_sets checks that against every training line and stops if one leaks.

EVAL_FACTS = [  # (held-out question zh, choices zh (right one first), question en, choices en)
    ("一个星期一共有几天？", ["七天", "五天", "十天", "三天"], "How many days does one week have?", ["seven", "five", "ten", "three"]),
    ("一年一共有几个月？", ["十二个月", "十个月", "六个月", "二十个月"], "How many months does one year have?", ["twelve", "ten", "six", "twenty"]),
    ("一整天一共有几个小时？", ["二十四小时", "十二小时", "十小时", "六十小时"], "How many hours does one whole day have?", ["twenty-four", "twelve", "ten", "sixty"]),
    ("世界上面积最大的海洋叫什么？", ["太平洋", "大西洋", "印度洋", "北冰洋"], "Which ocean is the biggest one?", ["the Pacific", "the Atlantic", "the Indian", "the Arctic"]),
    ("太阳每天早上从哪个方向出来？", ["东方", "西方", "南方", "北方"], "In which direction does the sun come up?", ["east", "west", "south", "north"]),
    ("中国长度最长的河流叫什么？", ["长江", "黄河", "珠江", "淮河"], "Which river is the longest one in China?", ["the Yangtze", "the Nile", "the Thames", "the Rhine"]),
]


def choice_row(rng, question, choices, subject):
    """Choices shuffled; the right one (given first) is recorded by its new index."""
    order = list(range(len(choices)))
    rng.shuffle(order)
    return {"question": question, "choices": [choices[i] for i in order], "answer": order.index(0), "subject": subject}


def other_values(rng, values, right, k=3):
    return rng.sample([v for v in values if v != right], k)


def make_eval_mc(rng):
    """Bilingual multiple choice, scored as continuations (the choice text follows the question
    directly; English choices carry their leading space)."""
    rows = []
    capitals_zh, capitals_en = [row[1] for row in CAPITALS], [row[3] for row in CAPITALS]
    for c, cap, c_en, cap_en in CAPITALS:
        rows.append(choice_row(rng, f"问：{c}的首都是哪座城市？答：", [cap] + other_values(rng, capitals_zh, cap), "capitals_zh"))
        rows.append(choice_row(rng, f"Q: Which city is the capital city of {c_en}? A:",
                               [" " + x for x in [cap_en] + other_values(rng, capitals_en, cap_en)], "capitals_en"))
    colours_zh, colours_en = [row[1] for row in COLOURS], [row[3] for row in COLOURS]
    for t, col, t_en, col_en in COLOURS:
        rows.append(choice_row(rng, f"问：{t}通常是什么颜色？答：", [col] + other_values(rng, colours_zh, col), "colours_zh"))
        rows.append(choice_row(rng, f"Q: What color is {t_en} usually? A:",
                               [" " + x for x in [col_en] + other_values(rng, colours_en, col_en)], "colours_en"))
    for q_zh, choices_zh, q_en, choices_en in EVAL_FACTS:
        rows.append(choice_row(rng, f"问：{q_zh}答：", choices_zh, "facts_zh"))
        rows.append(choice_row(rng, f"Q: {q_en} A:", [" " + x for x in choices_en], "facts_en"))
    return rows


def make_eval_gen(rng, training_text, n=60):
    """Sums and differences in the SFT wordings, and apple word problems in the reasoning
    wording, whose exact question no training file contains."""
    rows, seen = [], set()
    names = ["小明", "小红", "小华"]
    while len(rows) < n:
        if len(rows) % 3 == 2:
            name, a, b = rng.choice(names), rng.randint(2, 9), rng.randint(2, 9)
            question, answer = f"{name}有{a}个苹果，妈妈又给了他{b}个，{name}现在有几个苹果？", a + b
        else:
            question, text_answer = arithmetic_pair(rng, english=rng.random() < 0.25)
            answer = int(text_answer.rstrip("。.").split("等于")[-1].split(" equals ")[-1])
        if question in seen or question in training_text:
            continue
        seen.add(question)
        rows.append({"question": question, "answer": str(answer)})
    return rows


def make_eval_text(rng, training_lines, n=200):
    """Documents made like pretrain.jsonl's (3-8 fact sentences and sums), none identical to a
    training line."""
    rows = []
    while len(rows) < n:
        row = make_pretrain(rng, 1)[0]
        if row["text"] not in training_lines:
            rows.append(row)
    return rows


def check_held_out(eval_rows, training_text):
    leaked = [row["question"] for row in eval_rows
              if row["question"].removeprefix("问：").removesuffix("答：") in training_text]
    if leaked:
        raise SystemExit(f"evaluation questions found in the training data: {leaked[:3]}")


def make_eval_sets(out, seed, training_files):
    """eval_mc.jsonl, eval_gen.jsonl, eval_text.jsonl, from their own random stream (the training
    files do not change when these do)."""
    rng = random.Random(seed + 18)
    training_text = "\n".join(json.dumps(row, ensure_ascii=False) for rows in training_files for row in rows)
    mc = make_eval_mc(rng)
    check_held_out(mc, training_text)
    write_jsonl(out / "eval_mc.jsonl", mc)
    write_jsonl(out / "eval_gen.jsonl", make_eval_gen(rng, training_text))
    write_jsonl(out / "eval_text.jsonl", make_eval_text(rng, {row["text"] for row in training_files[0]}))


# ------------------------------------------------------------------ tool calling (model/tools.py's built-ins)

TOOL_SYSTEM_PROMPTS = ["You are MiniMind, a helpful assistant.", "你是MiniMind，一个乐于助人的助手。"]
ARITHMETIC_OPS = [  # (python operator, English word, Chinese word, shown sign)
    ("+", "plus", "加", "+"), ("-", "minus", "减", "-"), ("*", "times", "乘以", "×"), ("/", "divided by", "除以", "÷")]
CALC_Q_EN = ["What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "Please compute {a} {op} {b}.",
             "How much is {a} {op} {b}?", "What is {a}{sign}{b}?"]
CALC_Q_ZH = ["{a}{op}{b}等于多少？", "请计算{a}{op}{b}。", "帮我算一下{a}{op}{b}。", "{a}{sign}{b}是多少？",
             "计算{a}{sign}{b}"]
UNIT_PAIRS = [  # (from, to, English names, Chinese names, value range)
    ("km", "mile", ("km", "miles"), ("公里", "英里"), (1, 100)),
    ("mile", "km", ("miles", "km"), ("英里", "公里"), (1, 100)),
    ("kg", "lb", ("kg", "pounds"), ("公斤", "磅"), (1, 120)),
    ("lb", "kg", ("pounds", "kg"), ("磅", "公斤"), (1, 200)),
    ("celsius", "fahrenheit", ("degrees Celsius", "Fahrenheit"), ("摄氏度", "华氏度"), (-20, 45)),
    ("fahrenheit", "celsius", ("degrees Fahrenheit", "Celsius"), ("华氏度", "摄氏度"), (0, 110)),
    ("m", "ft", ("meters", "feet"), ("米", "英尺"), (1, 500)),
    ("inch", "cm", ("inches", "cm"), ("英寸", "厘米"), (1, 80)),
]
UNIT_Q_EN = ["Convert {v} {f} to {t}.", "How many {t} is {v} {f}?", "What is {v} {f} in {t}?"]
UNIT_Q_ZH = ["{v}{f}等于多少{t}？", "把{v}{f}换算成{t}。", "{v}{f}是多少{t}？"]
DATE_Q_EN = {0: ["What is the date today?", "What day is it today?", "Which date is it today?"],
             1: ["What date will it be in {d} days?", "Which day is {d} days from now?", "What is the date {d} days from today?"]}
DATE_Q_ZH = {0: ["今天是几号？", "今天是星期几？", "今天的日期是什么？"],
             1: ["{d}天后是几号？", "{d}天以后是哪一天？", "从今天起{d}天后是什么日期？"]}
WEEKDAY_ZH = {"Monday": "星期一", "Tuesday": "星期二", "Wednesday": "星期三", "Thursday": "星期四",
              "Friday": "星期五", "Saturday": "星期六", "Sunday": "星期日"}
FACT_Q_EN = ["Look up the {what} of {topic}.", "What is the {what} of {topic}?", "Tell me the {what} of {topic}."]
FACT_Q_ZH = ["查一下{topic}的数据。", "{topic}的数据是多少？", "告诉我{topic}的数据。"]


def call(name, arguments):
    return {"name": name, "arguments": arguments}


def tool_row(rng, registry, question, steps, answer, needed, english):
    """A conversation in one of the two shapes SFTDataset reads (alternating, to train both):
    minimind-3's (tools on the system message and tool_calls as JSON strings) or OpenAI's
    (tools beside the messages, objects). steps: rounds of calls; results come from running them."""
    offered = list(needed)
    extra = [n for n in registry.names() if n not in offered]
    if len(offered) < 2 and rng.random() < 0.3:  # a second tool the question does not need
        offered.append(rng.choice(extra))
    rng.shuffle(offered)
    conversation = [{"role": "user", "content": question}]
    for calls in steps:
        ids = [f"call_{rng.getrandbits(32):08x}" for _ in calls]
        tool_calls = [{"id": i, "type": "function", "function": c} for i, c in zip(ids, calls)]
        conversation.append({"role": "assistant", "content": "", "tool_calls": tool_calls})
        for i, c in zip(ids, calls):
            result = registry.run(ToolCall(c["name"], c["arguments"], json.dumps(c)), offered)
            conversation.append({"role": "tool", "tool_call_id": i, "content": result})
    conversation.append({"role": "assistant", "content": answer})
    system = {"role": "system", "content": rng.choice(TOOL_SYSTEM_PROMPTS[:1] if english else TOOL_SYSTEM_PROMPTS[1:])}
    tools = registry.schemas(offered)
    if rng.random() < 0.5:
        for message in conversation:
            if message.get("tool_calls"):
                message["tool_calls"] = json.dumps(message["tool_calls"], ensure_ascii=False)
        return {"conversations": [{**system, "tools": json.dumps(tools, ensure_ascii=False)}] + conversation}
    return {"tools": tools, "messages": ([system] if rng.random() < 0.3 else []) + conversation}


def calc_operands(rng, op):
    if op == "/":
        b = rng.randint(2, 30)
        return b * rng.randint(2, 60), b
    if op == "*":
        return rng.randint(2, 99), rng.randint(2, 99)
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return (max(a, b), min(a, b)) if op == "-" else (a, b)


def calculator_example(rng, registry, english):
    op, word_en, word_zh, sign = rng.choice(ARITHMETIC_OPS)
    a, b = calc_operands(rng, op)
    result = json.loads(registry.run(ToolCall("calculator", {"expression": f"{a}{op}{b}"}, "")))["result"]
    if english:
        question = rng.choice(CALC_Q_EN).format(a=a, b=b, op=word_en, sign=sign)
        answer = f"The result is {result}."
    else:
        question = rng.choice(CALC_Q_ZH).format(a=a, b=b, op=word_zh, sign=sign)
        answer = f"结果是{result}。"
    return question, [[call("calculator", {"expression": f"{a}{op}{b}"})]], answer, ["calculator"], [str(result)]


def unit_example(rng, registry, english):
    source, target, names_en, names_zh, (low, high) = rng.choice(UNIT_PAIRS)
    value = rng.randint(low, high)
    arguments = {"value": value, "from_unit": source, "to_unit": target}
    result = json.loads(registry.run(ToolCall("unit_converter", arguments, "")))["result"]
    if english:
        question = rng.choice(UNIT_Q_EN).format(v=value, f=names_en[0], t=names_en[1])
        answer = f"That is {result} {names_en[1]}."
    else:
        question = rng.choice(UNIT_Q_ZH).format(v=value, f=names_zh[0], t=names_zh[1])
        answer = f"等于{result}{names_zh[1]}。"
    return question, [[call("unit_converter", arguments)]], answer, ["unit_converter"], [str(result)]


def date_example(rng, registry, english, days_range=(2, 60)):
    days = 0 if rng.random() < 0.3 else rng.randint(*days_range)
    arguments = {"days_from_now": days} if days else {}
    day = json.loads(registry.run(ToolCall("date_time", arguments, "")))
    questions = (DATE_Q_EN if english else DATE_Q_ZH)[1 if days else 0]
    question = rng.choice(questions).format(d=days)
    if english:
        answer = f"{'Today is' if not days else f'In {days} days it will be'} {day['weekday']}, {day['date']}."
    else:
        answer = f"{'今天' if not days else f'{days}天后'}是{day['date']}，{WEEKDAY_ZH[day['weekday']]}。"
    return question, [[call("date_time", arguments)]], answer, ["date_time"], [day["date"]]


def fact_example(rng, registry, english):
    topic = rng.choice(list(DEMO_FACTS))
    zh, value, what = DEMO_FACTS[topic]
    name = topic if english else zh
    if english:
        question = rng.choice(FACT_Q_EN).format(what=what, topic=topic.title())
        answer = f"The {what} of {topic.title()} is {value}."
    else:
        question = rng.choice(FACT_Q_ZH).format(topic=zh)
        answer = f"根据资料，{zh}：{value}。"
    return question, [[call("lookup_fact", {"topic": name})]], answer, ["lookup_fact"], [value]


def two_products_example(rng, registry, english):
    """Two calls in one turn: two products asked together."""
    (a, b), (c, d) = [(rng.randint(2, 60), rng.randint(2, 60)) for _ in range(2)]
    calls = [call("calculator", {"expression": f"{a}*{b}"}), call("calculator", {"expression": f"{c}*{d}"})]
    if english:
        question = f"What are {a} times {b} and {c} times {d}?"
        answer = f"{a} × {b} = {a * b}, and {c} × {d} = {c * d}."
    else:
        question = f"{a}乘以{b}和{c}乘以{d}分别是多少？"
        answer = f"{a}乘以{b}等于{a * b}，{c}乘以{d}等于{c * d}。"
    return question, [calls], answer, ["calculator"], [str(a * b), str(c * d)]


def convert_then_add_example(rng, registry, english):
    """Two rounds: convert, then a sum with the converted value."""
    value, extra = rng.randint(1, 50), rng.randint(1, 50)
    arguments = {"value": value, "from_unit": "km", "to_unit": "mile"}
    converted = json.loads(registry.run(ToolCall("unit_converter", arguments, "")))["result"]
    expression = f"{converted}+{extra}"
    total = json.loads(registry.run(ToolCall("calculator", {"expression": expression}, "")))["result"]
    steps = [[call("unit_converter", arguments)], [call("calculator", {"expression": expression})]]
    if english:
        question = f"Convert {value} km to miles, then add {extra} miles."
        answer = f"{value} km is {converted} miles; plus {extra} miles makes {total} miles."
    else:
        question = f"把{value}公里换算成英里，再加上{extra}英里。"
        answer = f"{value}公里等于{converted}英里，再加{extra}英里一共是{total}英里。"
    return question, steps, answer, ["unit_converter", "calculator"], [str(total)]


def no_tool_example(rng, registry, english):
    """Tools offered but not needed: the answer comes straight away."""
    pairs = [(q, a) for q, a in identity_pairs() + greeting_pairs() + capital_pairs() + colour_pairs()
             if is_english(q) == english]
    question, answer = rng.choice(pairs)
    needed = [rng.choice(registry.names())]  # offered, not called
    return question, [], answer, needed, [answer_key(answer)]


def answer_key(answer):
    """What a right answer to a demo question must contain: the name, capital or colour."""
    if "MiniMind" in answer:
        return "MiniMind"
    return re.search(r"(?:是| is )([^。.的]+)[。.的]", answer).group(1)


# kind of example -> share of the training conversations, and count in the held-out set
TOOL_KINDS = {calculator_example: (0.40, 24), unit_example: (0.13, 8), date_example: (0.09, 5),
              fact_example: (0.09, 5), two_products_example: (0.06, 4), convert_then_add_example: (0.08, 4),
              no_tool_example: (0.15, 10)}


def draw_example(rng, registry, kind, seen):
    """(question, steps, answer, needed tools, answer keys, english), its question not in `seen`
    when it calls a tool (held-out questions stay out of the training set)."""
    while True:
        english = rng.random() < 0.5
        example = kind(rng, registry, english) + (english,)
        if not (example[0] in seen and example[1]):
            seen.add(example[0])
            return example


def held_out_tool_examples(rng, registry, seen):
    return [draw_example(rng, registry, kind, seen) for kind, (_, count) in TOOL_KINDS.items() for _ in range(count)]


def training_tool_examples(rng, registry, n, seen):
    kinds, weights = list(TOOL_KINDS), [share for share, _ in TOOL_KINDS.values()]
    return [draw_example(rng, registry, rng.choices(kinds, weights)[0], seen) for _ in range(n)]


def tool_transcript(registry, question, steps, answer, needed):
    """One tool use as plain text for pretraining: the question, each round's <tool_call> blocks
    and their <tool_response>s, the answer (no tools block, no chat turns)."""
    parts = [question]
    for calls in steps:
        parts.append("\n".join(tool_call_text(c) for c in calls))
        parts += [f"<tool_response>\n{registry.run(ToolCall(c['name'], c['arguments'], json.dumps(c)), needed)}"
                  f"\n</tool_response>" for c in calls]
    parts.append(answer)
    return "\n".join(parts)


def make_tool_transcripts(rng, registry, n, held_out_questions):
    """n transcripts of the kinds that call a tool, in their training shares, as {"text"} rows
    (scripts/quickstart.py --tools 1 pretrains on them). A held-out question is drawn again;
    repeats among the n are allowed (there are fewer date questions than n)."""
    kinds = [kind for kind in TOOL_KINDS if kind is not no_tool_example]
    weights = [TOOL_KINDS[kind][0] for kind in kinds]
    transcripts = []
    while len(transcripts) < n:
        question, steps, answer, needed, _ = rng.choices(kinds, weights)[0](rng, registry, rng.random() < 0.5)
        if question not in held_out_questions:
            transcripts.append({"text": tool_transcript(registry, question, steps, answer, needed)})
    return transcripts


def make_tool_conversations(rng, registry, examples):
    return [tool_row(rng, registry, q, steps, answer, needed, english)
            for q, steps, answer, needed, _, english in examples]


def make_tool_eval(rng, registry, examples):
    """Held-out prompts: the question, the tools offered, the first round of calls expected
    (none when no tool is needed) and the strings a right final answer contains."""
    rows = []
    for question, steps, _, needed, keys, _ in examples:
        offered = list(needed) + ([rng.choice([n for n in registry.names() if n not in needed])]
                                  if len(needed) < 2 and rng.random() < 0.5 else [])
        rng.shuffle(offered)
        rows.append({"messages": [{"role": "user", "content": question}], "tools": registry.schemas(offered),
                     "expected_calls": steps[0] if steps else [], "answer": keys})
    return rows


def display_path(path: Path) -> str:
    """Repo-relative inside the repository, as given elsewhere (--out_dir may point anywhere)."""
    return str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{display_path(path)}: {len(rows)} lines, {path.stat().st_size / 1024:.0f} KB")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=str(ROOT / "dataset/demo"))
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)

    pretrain = make_pretrain(rng, 3000)
    sft = make_sft(rng, 2000)
    write_jsonl(out / "pretrain.jsonl", pretrain)
    write_jsonl(out / "sft.jsonl", sft)
    dpo, lora_identity, lora_medical = make_dpo(rng, 400), make_lora_identity(rng, 300), make_lora_medical(rng, 300)
    r1_mix = make_r1_mix(rng, 400)
    write_jsonl(out / "dpo.jsonl", dpo)
    write_jsonl(out / "lora_identity.jsonl", lora_identity)
    write_jsonl(out / "lora_medical.jsonl", lora_medical)
    write_jsonl(out / "r1_mix.jsonl", r1_mix)
    write_jsonl(out / "tokenizer_train.jsonl", make_tokenizer_train(rng, 1000, pretrain, sft))
    make_eval_sets(out, args.seed, [pretrain, sft, dpo, lora_identity, lora_medical, r1_mix])
    rl_rng = random.Random(args.seed + 17)  # its own stream: the files above stay as they were
    write_jsonl(out / "rlaif.jsonl", make_rlaif(rl_rng, 1000))
    write_jsonl(out / "rlaif_heldout.jsonl", make_rlaif(rl_rng, 200, held_out=True))
    write_tool_files(out, args.seed)


TOOL_CONVERSATIONS = 600  # bilingual tool conversations for SFT (dataset/demo/sft_tools.jsonl)


def held_out_tool_questions(seed):
    """The questions of tools_eval.jsonl (and the other held-out draws), drawn as write_tool_files draws them."""
    seen = set()
    held_out_tool_examples(random.Random(seed + 16), builtin_registry(), seen)
    return seen


def write_tool_files(out, seed):
    """sft_tools.jsonl (training) and tools_eval.jsonl (held-out prompts, drawn first: their
    questions never appear in the training file). Own random stream: the other files stay as they were."""
    rng, registry, seen = random.Random(seed + 16), builtin_registry(), set()
    held_out = held_out_tool_examples(rng, registry, seen)
    training = training_tool_examples(rng, registry, TOOL_CONVERSATIONS, seen)
    write_jsonl(out / "sft_tools.jsonl", make_tool_conversations(rng, registry, training))
    write_jsonl(out / "tools_eval.jsonl", make_tool_eval(rng, registry, held_out))


if __name__ == "__main__":
    main()
