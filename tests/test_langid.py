"""Offline language identification on short texts of the 14 languages of the research pack."""

import pytest

from safetyscope.langid import UNDETERMINED, identify

SHORT = {
    "am": "ይህ በጣም ጥሩ ቀን ነው፣ ሁላችሁም እንኳን ደህና መጣችሁ",
    "ar": "هذا يوم جميل جدا ونحن سعداء بوجودكم هنا",
    "de": "Das ist ein sehr schöner Tag und wir freuen uns, dass ihr hier seid",
    "en": "This is a really nice day and we are glad that you are all here",
    "es": "Este es un día muy bonito y nos alegra que todos estéis aquí",
    "fr": "C'est une très belle journée et nous sommes heureux que vous soyez tous là",
    "he": "זה יום יפה מאוד ואנחנו שמחים שכולכם כאן",
    "hi": "यह बहुत अच्छा दिन है और हमें खुशी है कि आप सब यहाँ हैं",
    "it": "È una giornata molto bella e siamo felici che siate tutti qui",
    "ja": "今日はとても良い天気で、皆さんが来てくれて嬉しいです",
    "ru": "Сегодня очень хороший день, и мы рады, что вы все здесь",
    "uk": "Сьогодні дуже гарний день, і ми раді, що ви всі тут",
    "zh": "今天天气很好，我们很高兴你们都在这里",
}


@pytest.mark.parametrize("lang", sorted(SHORT))
def test_short_sentences_of_each_script_language(lang):
    assert identify([SHORT[lang]]) == [lang]


def test_romanised_hindi_and_empty_texts_are_undetermined():
    # no library has a class for Hindi in Latin script; a low-confidence guess is not a language
    assert identify(["yaar tu bahut bakwaas karta hai, chup kar", None, "   "]) == [UNDETERMINED] * 3


def test_accuracy_per_language_on_the_research_pack(shared_data):
    import polars as pl

    for path in sorted((shared_data / "toxicity").glob("*.parquet")):
        lang = path.stem
        if lang == "ci_sample":
            continue
        texts = pl.read_parquet(path).filter(pl.col("split") == "test").head(100)["text"].to_list()
        got = identify(texts)
        if lang == "hi_latn":  # never taken for Hindi; mostly undetermined (measured: 0.83 und, 0.08 "en")
            assert "hi" not in got and got.count(UNDETERMINED) / len(got) > 0.4
        else:  # measured 0.82 (en: short tweets, 0.13 und) to 1.0; undetermined counts as wrong
            assert sum(g == lang for g in got) / len(got) >= 0.7, lang
