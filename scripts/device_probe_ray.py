"""GPU numbers for docs/RAY.md's 100M-image plan, on whatever accelerator machine runs it.

Measures (1) the forward throughput of a ViT-B/32 image tower (open_clip's default model: 12
layers, width 768, 50 tokens, 512-d output) in bf16 at batch 512, from random weights, since the
cost does not depend on the weights; (2) JPEG decode + resize-to-224 per CPU core when PIL is
present; (3) an IVF-PQ build and query on the GPU when faiss-gpu is present. Prints JSON.
"""

import json
import os
import time

out = {}
try:
    import torch
    import torch.nn as nn

    out["torch"] = torch.__version__
    out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None

    class ViTB32(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, 768, 32, 32, bias=False)
            self.cls = nn.Parameter(torch.zeros(1, 1, 768))
            self.pos = nn.Parameter(torch.zeros(1, 50, 768))
            layer = nn.TransformerEncoderLayer(768, 12, 3072, activation="gelu", batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, 12)
            self.proj = nn.Linear(768, 512, bias=False)

        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
            return nn.functional.normalize(self.proj(self.blocks(x)[:, 0]), dim=-1)

    if torch.cuda.is_available():
        m = ViTB32().cuda().eval()
        x = torch.randn(512, 3, 224, 224, device="cuda")
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(3):
                m(x)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                m(x)
            torch.cuda.synchronize()
        out["vit_b32_images_per_s"] = round(20 * 512 / (time.perf_counter() - t))
except Exception as e:  # report what is missing rather than nothing
    out["torch_error"] = repr(e)

try:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = (rng.random((375, 500, 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    t = time.perf_counter()
    for _ in range(200):
        im = Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224), Image.BICUBIC)
        np.asarray(im, dtype=np.float32)
    out["decode_resize_images_per_s_per_core"] = round(200 / (time.perf_counter() - t))
    out["cpu_cores"] = os.cpu_count()
except Exception as e:
    out["pil_error"] = repr(e)

try:
    import faiss
    import numpy as np

    out["faiss"] = faiss.__version__
    out["faiss_gpus"] = faiss.get_num_gpus()
    if faiss.get_num_gpus() > 0:
        n, d = 2_000_000, 512
        rng = np.random.default_rng(0)
        centers = rng.normal(size=(1000, d)).astype(np.float32)
        x = centers[rng.integers(0, 1000, n)] + 0.5 * rng.normal(size=(n, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        res = faiss.StandardGpuResources()
        co = faiss.GpuClonerOptions()
        co.useFloat16 = True
        nlist = 4096
        idx = faiss.index_cpu_to_gpu(res, 0, faiss.index_factory(d, f"IVF{nlist},PQ64x8", faiss.METRIC_INNER_PRODUCT), co)
        t = time.perf_counter()
        idx.train(x[: 64 * nlist])
        out["ivfpq_train_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        idx.add(x)
        out["ivfpq_add_vectors_per_s"] = round(n / (time.perf_counter() - t))
        q = x[:1000]
        faiss.GpuParameterSpace().set_index_parameter(idx, "nprobe", 64)
        t = time.perf_counter()
        idx.search(q, 100)
        out["ivfpq_gpu_query_ms_per_query_batch1000_nprobe64"] = round((time.perf_counter() - t), 4)
except Exception as e:
    out["faiss_error"] = repr(e)
print(json.dumps(out, indent=1))
