"""GenerationConfig's field checks at their edges: the smallest valid values are accepted,
infinities, booleans and text are refused as numbers, and each refusal reads as documented."""
import numpy as np
import pytest

from rmt_runtime import GenerationConfig, RuntimeInputError


def refusal(**fields):
    with pytest.raises(RuntimeInputError) as info:
        GenerationConfig(**fields)
    return str(info.value)


def test_the_smallest_valid_values_are_accepted():
    config = GenerationConfig(max_new_tokens=1, temperature=0, top_k=0, top_p=1.0, stop_tokens=(0,), seed=0)
    config.check(vocab_size=1)  # token 0 is inside a one-token vocabulary
    GenerationConfig(temperature=np.float32(0.5), repetition_penalty=np.float64(1e-9), max_new_tokens=np.int64(2))


@pytest.mark.parametrize("field", ["temperature", "repetition_penalty"])
@pytest.mark.parametrize("value", [float("inf"), True, "1.0", None])
def test_numbers_must_be_finite_numbers(field, value):
    message = refusal(**{field: value})
    assert message.startswith(f"{field} must be a finite number ") and message.endswith(f"got {value!r}")


def test_flags_must_be_booleans_word_for_word():
    assert refusal(rollover=1) == "rollover must be True or False, got 1"
    assert refusal(use_cache="yes") == "use_cache must be True or False, got 'yes'"
    assert refusal(rollover=None, use_cache=0) == ("rollover must be True or False, got None; "
                                                    "use_cache must be True or False, got 0")


def test_stop_tokens_outside_the_vocabulary_are_named():
    assert refusal(stop_tokens=(-1, 0, 3)) == "stop tokens [-1] are outside the vocabulary (ids are >= 0)"
    with pytest.raises(RuntimeInputError) as info:
        GenerationConfig(stop_tokens=(0, 96, 97)).check(vocab_size=97)
    assert str(info.value) == "stop tokens [97] are outside the vocabulary 0..96"
