import os

# Triton kernels run under the interpreter on CPU machines. This must be set before anything imports triton
# (transformers may), so it lives here, at the top of the first module pytest loads. On a GPU machine run
# the suite with TRITON_INTERPRET=0 to test the compiled kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from vtc.testing import llava_inputs, make_image, tiny_llava, tiny_llava_processor

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def processor():
    return tiny_llava_processor()


@pytest.fixture(scope="session")
def llava():
    return tiny_llava("llama", seed=0)


@pytest.fixture(scope="session")
def batch3(processor):
    """Three samples: different prompt lengths (so left padding), different images; sample 2 has two images."""
    questions = ["What is in the image?", "How many objects are there? Answer with one word.", "Where is it?"]
    images = [[make_image(0)], [make_image(1)], [make_image(2), make_image(3)]]
    return questions, images, llava_inputs(processor, questions, images)


@pytest.fixture(scope="session")
def single(processor):
    return llava_inputs(processor, ["Describe the picture in detail, please."], [[make_image(5)]])
