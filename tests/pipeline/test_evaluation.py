from pipeline.evaluation import repeats_a_sentence


def test_a_reply_that_says_a_sentence_twice_word_for_word_is_counted():
    assert repeats_a_sentence("You can close it in the app. It takes 5 working days. You can  close it in the App.")
    assert not repeats_a_sentence("You can close it in the app. You can close it by phone.")
    assert not repeats_a_sentence("")
