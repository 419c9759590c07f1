"""Peer baseline: PyTorch/torchvision ResNet50 fine-tuning step throughput (run on a GPU).

Modes mirror the Keras workflows of docs/seeds.md:
  head  - whole backbone frozen, only the new Dense head trains
  conv5 - conv1..conv4 frozen (Keras ResNet50 layers[:143]), conv5 + head train
  full  - everything trains
BatchNorm always runs in inference mode (frozen statistics), as in those workflows.
Prints one JSON line per (mode, compiled) with images/s.
"""
import json, sys, time
import torch, torchvision

B = int(sys.argv[1]) if len(sys.argv) > 1 else 256
RES = int(sys.argv[2]) if len(sys.argv) > 2 else 224
STEPS = 30


def build(mode):
    m = torchvision.models.resnet50(weights=None)
    m.fc = torch.nn.Linear(2048, 10)
    for name, p in m.named_parameters():
        if mode == "head":
            p.requires_grad = name.startswith("fc.")
        elif mode == "conv5":
            p.requires_grad = name.startswith(("layer4.", "fc."))
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
    print(json.dumps(dict(peer="torch", mode=mode, compiled=compiled, batch=B, res=RES,
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
    print(json.dumps(dict(peer="torch", mode="forward", compiled=False, batch=B, res=RES,
                          img_s=round(B / dt, 1), step_ms=round(dt * 1e3, 2))), flush=True)


if __name__ == "__main__":
    torch.backends.cudnn.benchmark = True
    run_forward()
    for compiled in (False, True):
        for mode in ("head", "conv5", "full"):
            run(mode, compiled)
