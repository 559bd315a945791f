"""The PyTorch DCGAN example's generator, for `dcgan convert`'s test against real PyTorch.

make OUT: builds the example's netG (its weights_init), moves BatchNorm's running statistics
with a few training-mode passes, saves OUT/netG.pth (torch.save of the state_dict, as the
example does), OUT/z.json and OUT/out.json (netG.eval()(z), flattened NCHW).
check PTH REF: loads PTH into a fresh netG with strict=True and compares it with REF's tensors.
"""
import json
import sys

import torch
import torch.nn as nn

NZ, NGF, NC = 16, 8, 3


class Generator(nn.Module):
    """The example's netG for 64x64 images (pytorch/examples dcgan/main.py)."""

    def __init__(self):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(NZ, NGF * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(NGF * 8), nn.ReLU(True),
            nn.ConvTranspose2d(NGF * 8, NGF * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(NGF * 4), nn.ReLU(True),
            nn.ConvTranspose2d(NGF * 4, NGF * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(NGF * 2), nn.ReLU(True),
            nn.ConvTranspose2d(NGF * 2, NGF, 4, 2, 1, bias=False), nn.BatchNorm2d(NGF), nn.ReLU(True),
            nn.ConvTranspose2d(NGF, NC, 4, 2, 1, bias=False), nn.Tanh(),
        )

    def forward(self, x):
        return self.main(x)


def weights_init(m):
    name = m.__class__.__name__
    if name.find("Conv") != -1:
        nn.init.normal_(m.weight.data, 0.0, 0.02)
    elif name.find("BatchNorm") != -1:
        nn.init.normal_(m.weight.data, 1.0, 0.02)
        nn.init.constant_(m.bias.data, 0)


def make(out):
    torch.manual_seed(7)
    net = Generator()
    net.apply(weights_init)
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, NZ, 1, 1))
    net.eval()
    z = torch.randn(4, NZ, 1, 1)
    with torch.no_grad():
        images = net(z)
    torch.save(net.state_dict(), f"{out}/netG.pth")
    json.dump(z.reshape(4, NZ).tolist(), open(f"{out}/z.json", "w"))
    json.dump(images.reshape(-1).tolist(), open(f"{out}/out.json", "w"))
    print(torch.__version__)


def check(pth, ref):
    net = Generator()
    net.load_state_dict(torch.load(pth, weights_only=True), strict=True)
    want = torch.load(ref, weights_only=True)
    got = net.state_dict()
    for k, v in want.items():
        if not torch.equal(got[k], v):
            sys.exit(f"{k} differs after the round trip")
    print(f"{len(want)} tensors equal")


if __name__ == "__main__":
    {"make": lambda: make(sys.argv[2]), "check": lambda: check(sys.argv[2], sys.argv[3])}[sys.argv[1]]()
