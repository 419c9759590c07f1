"""Peer baseline: PyTorch/torchvision fine-tuning step throughput (run on a GPU).

    python benchmarks/peers/peer_torch.py [BATCH] [SIDE] [MODEL]

MODEL is fineflax's backbone name: resnet50, convnext_tiny, efficientnetv2_s (torchvision's
efficientnet_v2_s: the same network) or vit_b_16_torchvision (vit_b_16).

Modes mirror the Keras workflows of docs/seeds.md:
  head  - whole backbone frozen, only the new Dense head trains
  conv5 - ResNet50: conv1..conv4 frozen (Keras layers[:143]), conv5 + head train;
          ConvNeXt: everything before the last stage (its downsampling, features.6) frozen;
          EfficientNetV2: block6 on (features.6, the top conv) trains, as fineflax's conv5;
          ViT-B/16: the last quarter (encoder layers 9-11, the final norm) trains
  full  - everything trains
The model runs in inference mode (BatchNorm statistics frozen, as in those workflows; no
stochastic depth). Prints one JSON line per (mode, compiled) with images/s.
"""
import json, sys, time
import torch, torchvision

B = int(sys.argv[1]) if len(sys.argv) > 1 else 256
RES = int(sys.argv[2]) if len(sys.argv) > 2 else 224
MODEL = sys.argv[3] if len(sys.argv) > 3 else "resnet50"
STEPS = 30
# The new head's parameters, and those of the last stage (conv5 mode), by name prefix.
TORCHVISION = {"efficientnetv2_s": "efficientnet_v2_s", "vit_b_16_torchvision": "vit_b_16"}
HEAD = {"resnet50": ("fc.",), "convnext_tiny": ("classifier.2.",),
        "efficientnetv2_s": ("classifier.1.",), "vit_b_16_torchvision": ("heads.head.",)}[MODEL]
LAST_STAGE = {"resnet50": ("layer4.",), "convnext_tiny": ("features.6.", "features.7.", "classifier."),
              "efficientnetv2_s": ("features.6.", "features.7."),
              "vit_b_16_torchvision": tuple(f"encoder.layers.encoder_layer_{i}." for i in (9, 10, 11))
              + ("encoder.ln.",)}[MODEL]


def build(mode):
    m = getattr(torchvision.models, TORCHVISION.get(MODEL, MODEL))(weights=None)
    if MODEL == "resnet50":
        m.fc = torch.nn.Linear(2048, 10)
    elif MODEL == "vit_b_16_torchvision":
        m.heads.head = torch.nn.Linear(m.heads.head.in_features, 10)
    else:
        last = len(m.classifier) - 1  # ConvNeXt: classifier.2; EfficientNetV2: classifier.1
        m.classifier[last] = torch.nn.Linear(m.classifier[last].in_features, 10)
    for name, p in m.named_parameters():
        if mode == "head":
            p.requires_grad = name.startswith(HEAD)
        elif mode == "conv5":
            p.requires_grad = name.startswith(LAST_STAGE + HEAD)
        else:
            p.requires_grad = True
    m = m.cuda().to(memory_format=torch.channels_last)
    m.eval()  # BN uses running stats: frozen, as Keras training=False
    return m


def run(mode, compiled):
    m = build(mode)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)
    x = torch.randn(B, 3, RES, RES, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (B,), device="cuda")

    def step(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    f = torch.compile(step) if compiled else step
    t0 = time.time()
    for _ in range(3):
        f(x, y)
    torch.cuda.synchronize()
    warm = time.time() - t0
    t0 = time.time()
    for _ in range(STEPS):
        f(x, y)
    torch.cuda.synchronize()
    dt = (time.time() - t0) / STEPS
    print(json.dumps(dict(peer="torch", model=MODEL, mode=mode, compiled=compiled, batch=B, res=RES,
                          img_s=round(B / dt, 1), step_ms=round(dt * 1e3, 2), warmup_s=round(warm, 1))), flush=True)


def run_forward():
    m = build("head")
    x = torch.randn(B, 3, RES, RES, device="cuda").to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            m(x)
        torch.cuda.synchronize()
        t0 = time.time()
        for _ in range(STEPS):
            m(x)
        torch.cuda.synchronize()
    dt = (time.time() - t0) / STEPS
    print(json.dumps(dict(peer="torch", model=MODEL, mode="forward", compiled=False, batch=B, res=RES,
                          img_s=round(B / dt, 1), step_ms=round(dt * 1e3, 2))), flush=True)


if __name__ == "__main__":
    torch.backends.cudnn.benchmark = True
    run_forward()
    for compiled in (False, True):
        for mode in ("head", "conv5", "full"):
            run(mode, compiled)
