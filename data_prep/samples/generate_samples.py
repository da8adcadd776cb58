"""Write the bundled sample data in each real schema (run once; outputs are committed).

    python data_prep/samples/generate_samples.py

- medical_o1_sample.json   FreedomIntelligence/medical-o1-reasoning-SFT shape (Question, Complex_CoT, Response)
- kocommercial_sample.jsonl  MarkrAI/KoCommercial-Dataset shape (instruction, input, output), Korean
- aihub/*.xlsx              AI Hub Korean-English parallel corpus shape (원문, 번역문 plus AI Hub's other columns)
- korean_qa_sample.jsonl    context QA (context, question, answer, answers), Korean: `train eval` and the QA recipe
- medical_eval_sample.jsonl  open medical questions with the reference diagnosis: the demo's eval table
- keyword_tags_sample.jsonl  multi-label keyword tagging (text, labels list): `train classify`
- preference_sample.jsonl   (prompt, chosen, rejected) and ratings_sample.jsonl (prompt, response, rating):
                            reward and dpo; verifiable_sample.jsonl (question, answer): grpo

The cases are written for this project; they are small, deterministic and schema-faithful so the
demo and the tests exercise the real loaders. A few rows are deliberately defective (empty
output, unclosed <think>) so that the demo's manifest shows rejects being counted.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (finding A, finding B, reasoning about A, reasoning about B, diagnosis, management)
MEDICAL_CASES = [
    (
        "crushing chest pain radiating to the left arm",
        "ST elevation in leads II, III and aVF",
        "Crushing pain radiating to the arm is typical of myocardial ischemia",
        "ST elevation in the inferior leads localizes the infarct to the right coronary territory",
        "an acute inferior myocardial infarction",
        "urgent reperfusion with primary PCI",
    ),
    (
        "polyuria and polydipsia",
        "a fasting glucose of 180 mg/dL",
        "Excess urination and thirst point to an osmotic diuresis",
        "a fasting glucose above 126 mg/dL meets the diagnostic threshold",
        "type 2 diabetes mellitus",
        "lifestyle change and metformin",
    ),
    (
        "fever and a productive cough",
        "a right lower lobe consolidation on chest X-ray",
        "Fever with a productive cough suggests a lower respiratory infection",
        "a lobar consolidation confirms pneumonia rather than bronchitis",
        "community-acquired pneumonia",
        "empiric antibiotics such as amoxicillin",
    ),
    (
        "right lower quadrant pain",
        "rebound tenderness at McBurney's point",
        "Pain that migrates to the right lower quadrant is classic for appendiceal inflammation",
        "rebound tenderness signals peritoneal irritation",
        "acute appendicitis",
        "surgical appendectomy",
    ),
    (
        "fatigue and pallor",
        "a low ferritin with microcytic red cells",
        "Fatigue and pallor reflect reduced oxygen-carrying capacity",
        "low ferritin with small red cells indicates depleted iron stores",
        "iron deficiency anemia",
        "oral iron and a search for blood loss",
    ),
    (
        "heat intolerance and weight loss",
        "a suppressed TSH with high free T4",
        "Heat intolerance with weight loss suggests a hypermetabolic state",
        "a low TSH with high T4 shows primary hyperthyroidism",
        "Graves' disease",
        "antithyroid drugs such as methimazole",
    ),
    (
        "sudden weakness of the right arm",
        "slurred speech that began an hour ago",
        "Sudden unilateral weakness points to a lesion in the contralateral hemisphere",
        "new speech disturbance with a clear onset time suggests an acute stroke",
        "an acute ischemic stroke",
        "CT to exclude bleeding, then thrombolysis within the window",
    ),
    (
        "wheezing and shortness of breath at night",
        "improvement after an inhaled bronchodilator",
        "Nocturnal wheeze suggests reversible airway narrowing",
        "a response to bronchodilators confirms reversibility",
        "asthma",
        "inhaled corticosteroids with a rescue inhaler",
    ),
    (
        "burning epigastric pain after meals",
        "a positive urea breath test",
        "Epigastric burning related to meals suggests peptic disease",
        "a positive urea breath test shows Helicobacter pylori infection",
        "a peptic ulcer due to H. pylori",
        "eradication therapy with a PPI and two antibiotics",
    ),
    (
        "a painful swollen first toe",
        "needle-shaped crystals in the joint fluid",
        "Acute monoarthritis of the big toe is typical of a crystal arthropathy",
        "negatively birefringent needle-shaped crystals are monosodium urate",
        "acute gout",
        "NSAIDs or colchicine for the flare",
    ),
    (
        "headache and neck stiffness",
        "cloudy cerebrospinal fluid with neutrophils",
        "Headache with neck stiffness suggests meningeal irritation",
        "neutrophilic cloudy CSF indicates a bacterial cause",
        "bacterial meningitis",
        "immediate intravenous antibiotics",
    ),
    (
        "leg swelling after a long flight",
        "a positive D-dimer and a non-compressible vein",
        "Unilateral leg swelling after immobility raises concern for venous thrombosis",
        "a non-compressible vein on ultrasound confirms the clot",
        "deep vein thrombosis",
        "anticoagulation",
    ),
    (
        "dysuria and urinary frequency",
        "nitrites and leukocytes on dipstick",
        "Painful frequent urination suggests lower urinary tract inflammation",
        "nitrites indicate gram-negative bacteria",
        "an uncomplicated urinary tract infection",
        "a short course of nitrofurantoin",
    ),
    (
        "progressive memory loss over two years",
        "normal thyroid function and B12 levels",
        "Gradual memory decline over years suggests a neurodegenerative process",
        "normal thyroid and B12 results exclude reversible causes",
        "Alzheimer's disease",
        "cholinesterase inhibitors and support",
    ),
    (
        "a resting tremor and slow movements",
        "cogwheel rigidity on examination",
        "A resting tremor with bradykinesia suggests basal ganglia dysfunction",
        "cogwheel rigidity completes the parkinsonian triad",
        "Parkinson's disease",
        "levodopa",
    ),
    (
        "jaundice and dark urine",
        "a markedly raised ALT with positive hepatitis A IgM",
        "Jaundice with dark urine points to hepatocellular injury",
        "IgM antibodies show a recent hepatitis A infection",
        "acute hepatitis A",
        "supportive care",
    ),
]

DEMOGRAPHICS = [
    "A 45-year-old man",
    "A 62-year-old woman",
    "A 30-year-old woman",
    "A 71-year-old man",
    "A 54-year-old woman",
    "A 38-year-old man",
    "A 67-year-old woman",
    "A 23-year-old man",
]

QUESTION_FORMS = [
    "{who} presents with {a}. Examination and tests show {b}. What is the most likely diagnosis?",
    "{who} comes to the clinic with {a}, and work-up reveals {b}. What is the diagnosis and how should it be managed?",
]

KO_MEDICAL = [
    (
        "45세 남성이 왼팔로 퍼지는 흉통을 호소합니다. 심전도에서 하벽 ST 분절 상승이 보입니다. 가장 가능성 높은 진단은?",
        "흉통이 팔로 퍼지는 것은 심근 허혈의 전형적인 양상입니다. 하벽 유도의 ST 상승은 우관상동맥 영역의 경색을 시사합니다.",
        "급성 하벽 심근경색이 가장 가능성이 높으며, 즉시 관상동맥 중재술이 필요합니다.",
    ),
    (
        "30세 여성이 다뇨와 다갈증을 호소하고 공복 혈당이 180 mg/dL입니다. 진단은 무엇입니까?",
        "다뇨와 다갈증은 삼투성 이뇨를 시사합니다. 공복 혈당 126 mg/dL 이상은 당뇨병 진단 기준에 해당합니다.",
        "제2형 당뇨병으로 진단하며, 생활습관 교정과 메트포르민으로 치료를 시작합니다.",
    ),
    (
        "62세 여성이 발열과 가래 기침이 있고 흉부 X선에서 우하엽 경화가 보입니다. 진단은?",
        "발열과 가래 기침은 하기도 감염을 시사합니다. 엽성 경화는 기관지염이 아닌 폐렴을 뜻합니다.",
        "지역사회획득 폐렴이며, 아목시실린 등 경험적 항생제로 치료합니다.",
    ),
    (
        "23세 남성이 우하복부 통증과 맥버니 점 반발 압통을 보입니다. 가장 가능성 높은 진단은?",
        "우하복부로 이동하는 통증은 충수염의 전형입니다. 반발 압통은 복막 자극을 뜻합니다.",
        "급성 충수염이며, 충수 절제술이 필요합니다.",
    ),
    (
        "54세 여성이 피로와 창백함을 호소하고 페리틴이 낮으며 소구성 적혈구가 보입니다. 진단은?",
        "피로와 창백함은 산소 운반 능력 감소를 반영합니다. 낮은 페리틴과 소구성 적혈구는 철 결핍을 뜻합니다.",
        "철결핍성 빈혈이며, 경구 철분제와 출혈 원인 검사가 필요합니다.",
    ),
    (
        "71세 남성이 갑작스러운 오른팔 위약과 어눌한 말투를 보입니다. 가장 가능성 높은 진단은?",
        "갑작스러운 편측 위약은 반대쪽 대뇌 반구의 병변을 시사합니다. 발병 시각이 분명한 언어 장애는 급성 뇌졸중을 뜻합니다.",
        "급성 허혈성 뇌졸중이며, CT로 출혈을 배제한 뒤 혈전용해술을 고려합니다.",
    ),
]

KO_INSTRUCTIONS = [
    (
        "다음 문장을 한 문장으로 요약하세요.",
        "서울은 대한민국의 수도이며 정치, 경제, 문화의 중심지이다. 인구는 약 천만 명이다.",
        "서울은 인구 약 천만 명의 대한민국 수도이자 중심지입니다.",
    ),
    (
        "건강한 수면 습관 세 가지를 알려 주세요.",
        "",
        "1. 매일 같은 시간에 자고 일어나세요.\n2. 잠들기 전에 스마트폰 사용을 줄이세요.\n3. 오후에는 카페인을 피하세요.",
    ),
    ("다음 단어의 반대말을 쓰세요.", "뜨겁다", "뜨겁다의 반대말은 차갑다입니다."),
    ("다음 단어의 반대말을 쓰세요.", "크다", "크다의 반대말은 작다입니다."),
    ("다음 단어의 반대말을 쓰세요.", "빠르다", "빠르다의 반대말은 느리다입니다."),
    (
        "고혈압 환자에게 권장되는 식습관을 설명해 주세요.",
        "",
        "고혈압 환자는 소금 섭취를 줄이고, 채소와 과일을 충분히 먹으며, 음주를 제한하는 것이 좋습니다.",
    ),
    ("다음 문장의 감정을 긍정 또는 부정으로 분류하세요.", "오늘 받은 진료는 정말 친절하고 만족스러웠어요.", "긍정"),
    ("다음 문장의 감정을 긍정 또는 부정으로 분류하세요.", "대기 시간이 너무 길어서 불편했습니다.", "부정"),
    (
        "물을 충분히 마셔야 하는 이유를 간단히 설명하세요.",
        "",
        "물은 체온을 조절하고 노폐물을 배출하며 혈액 순환을 돕기 때문에 충분히 마셔야 합니다.",
    ),
    ("다음 문장을 존댓말로 바꾸세요.", "밥 먹었어?", "식사하셨어요?"),
    ("다음 문장을 존댓말로 바꾸세요.", "내일 병원에 가.", "내일 병원에 가요."),
    (
        "감기와 독감의 차이를 설명해 주세요.",
        "",
        "감기는 여러 바이러스가 일으키는 가벼운 상기도 감염이고, 독감은 인플루엔자 바이러스가 일으키며 고열과 근육통이 더 심합니다.",
    ),
    (
        "규칙적인 운동의 장점을 두 가지 말해 주세요.",
        "",
        "규칙적인 운동은 심혈관 건강을 개선하고 스트레스를 줄여 줍니다.",
    ),
    ("다음 약어의 뜻을 쓰세요.", "CT", "CT는 컴퓨터 단층 촬영(Computed Tomography)의 약자입니다."),
    ("다음 약어의 뜻을 쓰세요.", "MRI", "MRI는 자기 공명 영상(Magnetic Resonance Imaging)의 약자입니다."),
    (
        "당뇨병 환자가 발 관리를 해야 하는 이유는 무엇인가요?",
        "",
        "당뇨병은 말초 신경과 혈류를 손상시켜 작은 상처도 쉽게 궤양으로 진행할 수 있으므로 매일 발을 살펴야 합니다.",
    ),
]

CITIES = [
    ("서울", "대한민국"),
    ("도쿄", "일본"),
    ("파리", "프랑스"),
    ("베를린", "독일"),
    ("런던", "영국"),
    ("로마", "이탈리아"),
    ("마드리드", "스페인"),
    ("오타와", "캐나다"),
    ("캔버라", "호주"),
    ("베이징", "중국"),
]

AIHUB_PAIRS = [
    ("오늘 날씨가 정말 좋네요.", "The weather is really nice today."),
    ("병원은 몇 시에 문을 여나요?", "What time does the hospital open?"),
    ("이 약은 하루에 두 번 드세요.", "Take this medicine twice a day."),
    ("머리가 아프고 열이 나요.", "I have a headache and a fever."),
    ("예약을 변경하고 싶습니다.", "I would like to change my appointment."),
    ("검사 결과는 다음 주에 나옵니다.", "The test results will come out next week."),
    ("식사 후에 약을 복용하세요.", "Take the medicine after meals."),
    ("알레르기가 있으신가요?", "Do you have any allergies?"),
    ("혈압을 재 보겠습니다.", "Let me check your blood pressure."),
    ("물을 많이 드시고 푹 쉬세요.", "Drink plenty of water and get some rest."),
    ("가까운 약국이 어디에 있나요?", "Where is the nearest pharmacy?"),
    ("수술은 약 두 시간 걸립니다.", "The surgery takes about two hours."),
    ("보험 카드를 보여 주시겠어요?", "Could you show me your insurance card?"),
    ("통증이 언제부터 시작되었나요?", "When did the pain start?"),
    ("이 서류에 서명해 주세요.", "Please sign this document."),
    ("금식은 검사 여덟 시간 전부터 해야 합니다.", "You must fast for eight hours before the test."),
    ("회의는 오후 세 시에 시작합니다.", "The meeting starts at three in the afternoon."),
    ("저는 한국어를 조금 할 수 있어요.", "I can speak a little Korean."),
    ("지하철역까지 걸어서 십 분 걸려요.", "It takes ten minutes to walk to the subway station."),
    ("주말에 가족과 함께 공원에 갔습니다.", "I went to the park with my family on the weekend."),
    ("이 제품은 환불이 가능합니까?", "Is this product refundable?"),
    ("내일 아침 일찍 출발할 예정입니다.", "We plan to leave early tomorrow morning."),
    ("새로운 정책은 다음 달부터 시행됩니다.", "The new policy takes effect next month."),
    ("어린이는 보호자와 함께 입장해야 합니다.", "Children must enter with a guardian."),
    ("창문을 열어도 될까요?", "May I open the window?"),
    ("배송은 보통 삼 일 정도 걸립니다.", "Delivery usually takes about three days."),
    ("이 근처에 좋은 식당이 있나요?", "Is there a good restaurant near here?"),
    ("손을 자주 씻는 것이 중요합니다.", "It is important to wash your hands often."),
    ("기차표를 두 장 예매했어요.", "I booked two train tickets."),
    ("감기에 걸려서 목이 아파요.", "I caught a cold and my throat hurts."),
    ("진료 시간은 오전 아홉 시부터입니다.", "Office hours start at nine in the morning."),
    ("주사를 맞은 부위가 부었어요.", "The injection site is swollen."),
    ("처방전을 약국에 제출하세요.", "Submit the prescription to the pharmacy."),
    ("엘리베이터는 복도 끝에 있습니다.", "The elevator is at the end of the hallway."),
    ("이번 주 금요일까지 보고서를 제출하세요.", "Submit the report by this Friday."),
    ("커피 한 잔 주시겠어요?", "Could I have a cup of coffee?"),
]


def medical_rows() -> list[dict]:
    rng = random.Random(3407)
    rows = []
    for a, b, ra, rb, dx, mgmt in MEDICAL_CASES:
        for form in QUESTION_FORMS:
            for who in rng.sample(DEMOGRAPHICS, 4):
                question = form.format(who=who, a=a, b=b)
                cot = (
                    f"Okay, let's work through this. The patient has {a}. {ra}. "
                    f"Then there is {b}; {rb}. Putting these together, the picture fits {dx}. "
                    f"So the best next step is {mgmt}."
                )
                response = f"The most likely diagnosis is {dx}. The key findings are {a} and {b}. Management: {mgmt}."
                rows.append({"Question": question, "Complex_CoT": cot, "Response": response})
    for q, cot, resp in KO_MEDICAL:
        rows.append({"Question": q, "Complex_CoT": "좋아요, 단계적으로 생각해 봅시다. " + cot, "Response": resp})
    rng.shuffle(rows)
    # Deliberate defects, as real dumps have: an unclosed <think> and an empty response.
    rows.append(
        {
            "Question": "A 50-year-old man has chest pain. Diagnosis?",
            "Complex_CoT": "<think> the reasoning was cut off here",
            "Response": "Angina.",
        }
    )
    rows.append(
        {
            "Question": "A 40-year-old woman has a cough. Diagnosis?",
            "Complex_CoT": "A cough alone is not specific.",
            "Response": "",
        }
    )
    return rows


def kocommercial_rows() -> list[dict]:
    rows = [{"instruction": i, "input": x, "output": o} for i, x, o in KO_INSTRUCTIONS]
    for city, country in CITIES:
        rows.append(
            {
                "instruction": f"{country}의 수도는 어디인가요?",
                "input": "",
                "output": f"{country}의 수도는 {city}입니다.",
            }
        )
    rng = random.Random(7)
    for _ in range(40):
        x, y = rng.randint(2, 49), rng.randint(2, 49)
        rows.append(
            {
                "instruction": "다음 두 수를 더하세요.",
                "input": f"{x}, {y}",
                "output": f"{x}와 {y}를 더하면 {x + y}입니다.",
            }
        )
    rng.shuffle(rows)
    rows.append(dict(rows[0]))  # an exact duplicate, as real merged datasets have
    rows.append({"instruction": "다음 문장을 번역하세요.", "input": "안녕하세요", "output": ""})  # empty output
    return rows


KO_FACTS = [  # (context, question, answers)
    ("한국의 국보 제1호였던 숭례문은 서울 중구에 있는 조선 시대의 성문이다.", "숭례문은 어느 도시에 있나요?", ["서울"]),
    (
        "인슐린은 이자의 베타세포에서 분비되어 혈당을 낮추는 호르몬이다.",
        "인슐린을 분비하는 세포는 무엇인가요?",
        ["베타세포"],
    ),
    (
        "성인의 정상 안정 시 심박수는 분당 60회에서 100회 사이이다.",
        "정상 안정 시 심박수의 하한은 분당 몇 회인가요?",
        ["60회", "60"],
    ),
    ("한글은 1443년 세종대왕이 창제하여 1446년에 반포하였다.", "한글을 창제한 왕은 누구인가요?", ["세종대왕", "세종"]),
    ("폐렴구균 백신은 65세 이상 성인에게 권장된다.", "폐렴구균 백신이 권장되는 나이는?", ["65세 이상"]),
    ("제주도는 대한민국에서 가장 큰 섬으로 한라산이 있다.", "한라산이 있는 섬은 어디인가요?", ["제주도", "제주"]),
]


def korean_qa_rows() -> list[dict]:
    rows = []
    for i, (city, country) in enumerate(CITIES):
        context = f"{country}의 수도는 {city}이다. {city}에는 {country}의 정부 기관이 모여 있다."
        answers = [city, "서울특별시"] if city == "서울" else [city]
        rows.append(
            {
                "id": f"capital-{i}",
                "context": context,
                "question": f"{country}의 수도는 어디인가요?",
                "answer": city,
                "answers": answers,
            }
        )
        rows.append(
            {
                "id": f"country-{i}",
                "context": context,
                "question": f"{city}은(는) 어느 나라의 수도인가요?",
                "answer": country,
                "answers": [country],
            }
        )
    for i, (context, question, answers) in enumerate(KO_FACTS):
        rows.append(
            {"id": f"fact-{i}", "context": context, "question": question, "answer": answers[0], "answers": answers}
        )
    return rows  # `answer` trains (one string); `answers` lists every accepted form for scoring


def medical_eval_rows() -> list[dict]:
    form = QUESTION_FORMS[0]
    return [
        {"id": f"case-{i}", "question": form.format(who=DEMOGRAPHICS[i % len(DEMOGRAPHICS)], a=a, b=b), "answer": [dx]}
        for i, (a, b, _, _, dx, _) in enumerate(MEDICAL_CASES)
    ]


TAG_PHRASES = {
    "cardiac": [
        "chest pain on exertion",
        "palpitations",
        "an irregular pulse",
        "ankle swelling",
        "high blood pressure",
    ],
    "respiratory": ["a productive cough", "wheezing at night", "shortness of breath", "a sore throat", "sputum"],
    "endocrine": [
        "high blood glucose",
        "weight gain and fatigue",
        "heat intolerance",
        "excessive thirst",
        "a thyroid nodule",
    ],
    "digestive": ["abdominal pain after meals", "heartburn", "nausea and vomiting", "diarrhea", "black stools"],
}
FILLERS = [
    "The patient reports {}.",
    "Main complaint: {}.",
    "Seen today for {}.",
    "History notable for {}.",
    "She describes {}.",
    "He mentions {}.",
]


def keyword_tag_rows(n: int = 320) -> list[dict]:
    rng = random.Random(11)
    tags = sorted(TAG_PHRASES)
    rows = []
    for _ in range(n):
        chosen = sorted(rng.sample(tags, rng.choice([1, 1, 2, 2, 3])))
        phrases = [rng.choice(TAG_PHRASES[t]) for t in chosen]
        rows.append({"text": rng.choice(FILLERS).format(" and ".join(phrases)), "labels": chosen})
    rows.append({"text": "", "labels": ["cardiac"]})  # defects, counted and written aside: empty text,
    rows.append({"text": "Seen today for a rash.", "labels": ["dermatology"]})  # a label outside labels:
    return rows


def preference_rows() -> tuple[list[dict], list[dict], list[dict]]:
    """Preferred: reasoning closed by </think>, then the right diagnosis. Rejected: a wrong one, or no reasoning."""
    rng = random.Random(5)
    pairs, ratings, verifiable = [], [], []
    for i, (a, b, ra, rb, dx, _) in enumerate(MEDICAL_CASES):
        wrong = MEDICAL_CASES[(i + 3) % len(MEDICAL_CASES)][4]
        for who in rng.sample(DEMOGRAPHICS, 3):
            q = QUESTION_FORMS[0].format(who=who, a=a, b=b)
            good = f"<think>\n{ra}. Then {rb}.\n</think>\nThe most likely diagnosis is {dx}."
            bad = rng.choice(
                [
                    f"<think>\n{ra}.\n</think>\nThe most likely diagnosis is {wrong}.",
                    f"The most likely diagnosis is {wrong}.",
                ]
            )
            pairs.append({"prompt": q, "chosen": good, "rejected": bad})
        q = QUESTION_FORMS[1].format(who=DEMOGRAPHICS[i % len(DEMOGRAPHICS)], a=a, b=b)
        ratings += [
            {"prompt": q, "response": f"<think>\n{ra}. Then {rb}.\n</think>\nIt is {dx}.", "rating": 9},
            {"prompt": q, "response": f"It is {dx}.", "rating": 6},
            {"prompt": q, "response": f"It is {wrong}.", "rating": 2},
        ]
        verifiable.append(
            {
                "question": QUESTION_FORMS[0].format(who=DEMOGRAPHICS[(i + 1) % len(DEMOGRAPHICS)], a=a, b=b),
                "answer": dx,
            }
        )
    pairs.append({"prompt": "A 30-year-old has a headache. Diagnosis?", "chosen": "Migraine.", "rejected": "Migraine."})
    ratings.append({"prompt": "A 40-year-old has back pain.", "response": "Strain.", "rating": "high"})
    return pairs, ratings, verifiable


def write_xlsx(path: Path, sheets: dict[str, list[tuple]]) -> None:
    from openpyxl import Workbook

    header = ("SID", "대분류", "소분류", "상황", "원문", "번역문")
    wb = Workbook()
    wb.remove(wb.active)
    for title, pairs in sheets.items():
        ws = wb.create_sheet(title)
        ws.append(header)
        for sid, (ko, en, major, minor) in pairs:
            ws.append((sid, major, minor, "일상", ko, en))
    wb.save(path)


def main() -> None:
    (HERE / "medical_o1_sample.json").write_text(
        json.dumps(medical_rows(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
    )
    with open(HERE / "kocommercial_sample.jsonl", "w", encoding="utf-8") as f:
        for row in kocommercial_rows():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    for name, rows in (
        ("korean_qa_sample.jsonl", korean_qa_rows()),
        ("medical_eval_sample.jsonl", medical_eval_rows()),
        ("keyword_tags_sample.jsonl", keyword_tag_rows()),
        *zip(
            ("preference_sample.jsonl", "ratings_sample.jsonl", "verifiable_sample.jsonl"),
            preference_rows(),
            strict=True,
        ),
    ):
        with open(HERE / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    aihub = HERE / "aihub"
    aihub.mkdir(exist_ok=True)
    tagged = [
        (f"{i:06d}", (ko, en, "의료" if i < 16 else "일상생활", "대화")) for i, (ko, en) in enumerate(AIHUB_PAIRS)
    ]
    write_xlsx(aihub / "1_구어체_sample.xlsx", {"Sheet1": tagged[:18]})
    # A second file with two sheets, as some AI Hub releases ship, and one blank 번역문 cell.
    second = tagged[18:]
    blank = ("999999", ("이 문장은 번역이 비어 있습니다.", None, "일상생활", "대화"))
    write_xlsx(aihub / "2_대화체_sample.xlsx", {"대화1": second[:9] + [blank], "대화2": second[9:]})


if __name__ == "__main__":
    main()
