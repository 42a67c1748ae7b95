"""TEST ORACLE -- used only by tests/test_scorers.py, never by the medsight package.

A line-by-line transliteration, written from reading the reference source, of the scorers the paper's
numbers come from, so that our own implementation (src/medsight/metrics/) can be checked against it on
random prediction files:

* microsoft/LLaVA-Med  llava/eval/eval_metrics/glossary.py        (normalize_word and its tables)
* microsoft/LLaVA-Med  llava/eval/eval_metrics/utils.py           (split_sentence)
* microsoft/LLaVA-Med  llava/eval/eval_metrics/evaluate_metrics.py (calculate_f1score)
* Aofei-Chang/MedSIGHT RegLLM/llava/eval/run_eval.py              (evaluate: closed/open loop)
* Aofei-Chang/MedSIGHT RegLLM/llava/eval/run_eval_mc.py           (find_most_similar_index, evaluate_mc)

The MedSIGHT repository imports `eval_metrics` but does not ship it; LLaVA-Med's copy is the one its
`run_eval.py` derives from. Deliberate departures, all marked "ORACLE:": pairing is positional (zip), as
in the reference, so callers pass predictions in test-set order; BLEU/exact-match columns are left out;
means over zero questions return 0 (run_eval_mc's guard) instead of raising ZeroDivisionError; and the
"overall" number (which the reference does not print) is added as the mean of closed hits and open
recalls over all questions.
"""

import collections
import difflib
import re

contractions = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
manual_map = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
articles = ["a", "an", "the"]
period_strip = re.compile(r"(?!<=\d)(\.)(?!\d)")
comma_strip = re.compile(r"(\d)(\,)(\d)")
punct = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
         "?", "!"]


def normalize_word(token):
    _token = token
    for p in punct:
        if (p + " " in token or " " + p in token) or (re.search(comma_strip, token) != None):  # noqa: E711 (as in the reference)
            _token = _token.replace(p, "")
        else:
            _token = _token.replace(p, " ")
    token = period_strip.sub("", _token, re.UNICODE)  # re.UNICODE lands in `count` (32), as in the reference

    _token = []
    temp = token.lower().split()
    for word in temp:
        word = manual_map.setdefault(word, word)
        if word not in articles:
            _token.append(word)
    for i, word in enumerate(_token):
        if word in contractions:
            _token[i] = contractions[word]
    token = " ".join(_token)
    token = token.replace(",", "")
    return token


def split_sentence(sentence, n):
    words = collections.defaultdict(int)
    tmp_sentence = sentence
    tmp_sentence = tmp_sentence.lower()
    tmp_sentence = tmp_sentence.strip().split()
    length = len(tmp_sentence)
    for i in range(length - n + 1):
        tmp_words = " ".join(tmp_sentence[i: i + n])
        if tmp_words:
            words[tmp_words] += 1
    return words


def calculate_f1score(candidate, reference):
    candidate = normalize_word(candidate)
    reference = normalize_word(reference)

    candidate_words = split_sentence(candidate, 1)
    reference_words = split_sentence(reference, 1)
    word_set = set()
    for word in candidate_words:
        word_set.add(word)
    for word in reference_words:
        word_set.add(word)

    tp = 0
    fp = 0
    fn = 0
    for word in word_set:
        if word in candidate_words and word in reference_words:
            tp += candidate_words[word]
        elif word in candidate_words and word not in reference_words:
            fp += candidate_words[word]
        elif word not in candidate_words and word in reference_words:
            fn += reference_words[word]

    if len(candidate_words) == 0 or len(reference_words) == 0:
        return 0, 0, 0
    else:
        precision = tp / (tp + fp)
        recall = tp / (tp + fn)
        if tp == 0:
            return 0, 0, 0
        else:
            return 2 * precision * recall / (precision + recall), precision, recall


def evaluate(gt, pred):
    """run_eval.py `evaluate`, the closed and F1 columns; returns fractions (not percentages)."""
    closed_scores = collections.defaultdict(list)
    f1_scores = collections.defaultdict(list)
    num_close, num_open = 0, 0
    for gt_item, pred_item in zip(gt, pred):
        if "conversations" in gt_item:
            gt_value = gt_item['conversations'][1]['value'].lower()
        else:
            if "short_answer" in gt_item:
                gt_value = gt_item["short_answer"].lower()
            else:
                gt_value = gt_item["answer"].lower()
        pred_value = pred_item['text'].lower()

        gt_value = normalize_word(gt_value)
        pred_value = normalize_word(pred_value)

        if gt_item['answer_type'].lower() == 'open':
            num_open += 1
            f1_score, precision, recall = calculate_f1score(pred_value, gt_value)
            f1_scores['f1'].append(f1_score)
            f1_scores['precision'].append(precision)
            f1_scores['recall'].append(recall)
            f1_scores['q_id'].append(pred_item['question_id'])
        elif gt_item['answer_type'].lower().startswith('close'):
            num_close += 1
            closed_scores['q_id'].append(pred_item['question_id'])
            if 'yes' in pred_value or 'no' in pred_value:
                if gt_value in pred_value:
                    closed_scores['hit'].append(1)
                else:
                    closed_scores['hit'].append(0)
            else:
                closed_scores['hit'].append(0)

    # ORACLE: guarded means (the reference raises ZeroDivisionError when there is no open question).
    def mean(xs):
        return sum(xs) / len(xs) if len(xs) != 0 else 0.0

    f1_score = mean(f1_scores['f1'])
    precision = mean(f1_scores['precision'])
    recall = mean(f1_scores['recall'])
    closed_score = sum(closed_scores['hit']) / len(closed_scores['hit']) if len(closed_scores['hit']) != 0 else 0.0
    # ORACLE: "overall" is not printed by the reference; SPEC section 7's reading of the paper's "all".
    overall = mean(closed_scores['hit'] + f1_scores['recall'])
    return {"closed_accuracy": closed_score, "open_recall": recall, "open_precision": precision,
            "open_f1": f1_score, "overall": overall, "n_closed": num_close, "n_open": num_open}


def str_similarity(str1, str2):
    seq = difflib.SequenceMatcher(None, str1, str2)
    return seq.ratio()


def find_most_similar_index(str_list, target_str):
    most_similar_str = None
    most_similar_index = None
    highest_similarity = 0
    for i, str in enumerate(str_list):
        similarity = str_similarity(str, target_str)
        if similarity > highest_similarity:
            most_similar_str = str  # noqa: F841
            most_similar_index = i
            highest_similarity = similarity
    return most_similar_index


def evaluate_mc(ground_truth_data, test_data):
    """run_eval_mc.py `evaluate_mc`; returns the accuracy as a fraction (the reference prints it)."""
    ACC = 0
    cc = 0
    for gt_sample, test_sample in zip(ground_truth_data, test_data):
        if "gt_answer" in gt_sample:
            label = gt_sample['gt_answer']
        else:
            gt_results = gt_sample['conversations']
            label = gt_results[1]['value'].lower()
        pred = test_sample['text']

        Choice_A = gt_sample['option_A']
        Choice_B = gt_sample['option_B']
        try:
            Choice_C = gt_sample['option_C']
            try:
                Choice_D = gt_sample['option_D']
                Choice_list = [Choice_A, Choice_B, Choice_C, Choice_D]
            except KeyError:
                Choice_list = [Choice_A, Choice_B, Choice_C]
        except KeyError:
            Choice_list = [Choice_A, Choice_B]

        index_pred = find_most_similar_index(Choice_list, pred)
        index_label = find_most_similar_index(Choice_list, label)
        if index_pred == index_label:
            ACC += 1
        cc += 1
    accuracy = ACC / cc if cc != 0 else 0
    return accuracy
