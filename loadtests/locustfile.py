"""Interactive load with locust: `locust -f loadtests/locustfile.py --host http://127.0.0.1:8000`."""

import random

from locust import HttpUser, between, task

PROMPTS = ["a small red circle in the top left on a white background",
           "a large blue square at the bottom right on a yellow background",
           "little green triangle, centre, black background"]


class ImageUser(HttpUser):
    wait_time = between(0.5, 2.0)

    @task(3)
    def generate(self) -> None:
        self.client.post("/v1/images/generations", name="generate",
                         json={"prompt": random.choice(PROMPTS),
                               "num_inference_steps": random.choice([2, 4, 8]),
                               "response_format": "b64_json"})

    @task(1)
    def stream(self) -> None:
        with self.client.post("/v1/images/generations", name="generate (stream)", stream=True,
                              json={"prompt": random.choice(PROMPTS), "stream": True,
                                    "partial_images": 2, "num_inference_steps": 8},
                              catch_response=True) as r:
            body = r.content.decode()
            if "image_generation.completed" not in body:
                r.failure("stream ended without a completed event")
