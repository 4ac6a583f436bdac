"""The einsum cascades of attention algorithms (FuseMax's notation), as data (b and h implicit; n1/n0 = key chunk/offset).

Algorithms name one of these (`attnfx.cost_model.algorithms`); tests check each against the
expected pass counts. Adding a cascade is adding an entry here. The model's own code is not here:
an algorithm that runs it as written is priced with the site's lifted cascade
(`attnfx.cost_model.cascade.Cascade.einsums`).
"""
from __future__ import annotations

from .einsums import EinsumCascade

_C = EinsumCascade.of

FUSEMAX_1 = _C("fusemax-1", "Y[] = A[n] * B[n]", "Z[n] = Y[] * A[n]", note="FuseMax Cascade 1")
FUSEMAX_2 = _C("fusemax-2", "Y[] = A[n] * B[n]", "X[] = A[n]", "Z[] = Y[] * X[]",
               note="FuseMax Cascade 2: deferred multiplication")
FUSEMAX_3 = _C("fusemax-3",
               "RY[n+1] = RY[n] + A[n] * B[n]",
               "RZ[n+1] = RZ[n] * (RY[n+1] / RY[n]) + RY[n+1] * A[n]",
               "Z[] = RZ[N]", note="FuseMax Cascade 3: iterative rank")

THREE_PASS = _C("3-pass",
                "QK[m,n] = Q[m,e] * K[n,e]",
                "GM[m] = max_n QK[m,n]",
                "SN[m,n] = exp(QK[m,n] - GM[m])",
                "SD[m] = sum_n SN[m,n]",
                "A[m,n] = SN[m,n] / SD[m]",
                "AV[m,f] = A[m,n] * V[n,f]", note="(a) FuseMax Cascade 4; eager PyTorch")

DEFERRED = _C("2-pass deferred",
              "QK[m,n] = Q[m,e] * K[n,e]",
              "GM[m] = max_n QK[m,n]",
              "SN[m,n] = exp(QK[m,n] - GM[m])",
              "SD[m] = sum_n SN[m,n]",
              "SNV[m,f] = SN[m,n] * V[n,f]",
              "AV[m,f] = SNV[m,f] / SD[m]", note="(b1) global max, deferred division")

LOCAL_MAX = _C("2-pass local-max",
               "BQK[m,n1,n0] = Q[m,e] * K[n1,n0,e]",
               "LM[m,n1] = max_n0 BQK[m,n1,n0]",
               "SLN[m,n1,n0] = exp(BQK[m,n1,n0] - LM[m,n1])",
               "SLD[m,n1] = sum_n0 SLN[m,n1,n0]",
               "GM[m] = max_n1 LM[m,n1]",
               "PRM[m,n1] = exp(LM[m,n1] - GM[m])",
               "SD[m] = SLD[m,n1] * PRM[m,n1]",
               "A[m,n1,n0] = SLN[m,n1,n0] * PRM[m,n1] / SD[m]",
               "AV[m,f] = A[m,n1,n0] * V[n1,n0,f]", note="(b2) local max per chunk")

ONLINE_SOFTMAX = _C("online softmax",
                    "RM[m,n+1] = max(RM[m,n], QK[m,n])",
                    "RD[m,n+1] = RD[m,n] * exp(RM[m,n] - RM[m,n+1]) + exp(QK[m,n] - RM[m,n+1])",
                    "A[m,n] = exp(QK[m,n] - RM[m,N]) / RD[m,N]",
                    note="(b3) Milakov-Gimelshein, softmax only")

UNSAFE_SOFTMAX = _C("unsafe softmax",
                    "SN[m,n] = exp(QK[m,n])", "SD[m] = sum_n SN[m,n]", "A[m,n] = SN[m,n] / SD[m]",
                    note="softmax without max subtraction")

ONE_PASS = _C("1-pass",
              "BQK[m,n1,n0] = Q[m,e] * K[n1,n0,e]",
              "LM[m,n1] = max_n0 BQK[m,n1,n0]",
              "RM[m,n1+1] = max(RM[m,n1], LM[m,n1])",
              "SLN[m,n1,n0] = exp(BQK[m,n1,n0] - RM[m,n1+1])",
              "SLD[m,n1] = sum_n0 SLN[m,n1,n0]",
              "SLNV[m,f,n1] = SLN[m,n1,n0] * V[n1,n0,f]",
              "PRM[m,n1] = exp(RM[m,n1] - RM[m,n1+1])",
              "SPD[m,n1] = RD[m,n1] * PRM[m,n1]",
              "RD[m,n1+1] = SLD[m,n1] + SPD[m,n1]",
              "SPNV[m,f,n1] = RNV[m,f,n1] * PRM[m,n1]",
              "RNV[m,f,n1+1] = SLNV[m,f,n1] + SPNV[m,f,n1]",
              "AV[m,f] = RNV[m,f,C] / RD[m,C]", note="(c) FuseMax Cascade 5, FlashAttention-2")

SPLIT_KV = _C("split-KV",
              "BQK[m,n1,n0] = Q[m,e] * K[n1,n0,e]",
              "LM[m,n1] = max_n0 BQK[m,n1,n0]",
              "SLN[m,n1,n0] = exp(BQK[m,n1,n0] - LM[m,n1])",
              "SLD[m,n1] = sum_n0 SLN[m,n1,n0]",
              "SLNV[m,f,n1] = SLN[m,n1,n0] * V[n1,n0,f]",
              "GM[m] = max_n1 LM[m,n1]",
              "W[m,n1] = exp(LM[m,n1] - GM[m])",
              "NUM[m,f] = W[m,n1] * SLNV[m,f,n1]",
              "DEN[m] = W[m,n1] * SLD[m,n1]",
              "AV[m,f] = NUM[m,f] / DEN[m]", note="Flash-Decoding: n1 = split, combine is light")

SIGMOID = _C("sigmoid",
             "QK[m,n] = Q[m,e] * K[n,e]",
             "SG[m,n] = sigmoid(QK[m,n] * c - log(N))",
             "AV[m,f] = SG[m,n] * V[n,f]", note="FlashSigmoid: no reduction before AV")

LINEAR = _C("linear",
            "PK[n,e] = phi(K[n,e])",
            "PQ[m,e] = phi(Q[m,e])",
            "KV[e,f] = PK[n,e] * V[n,f]",
            "KS[e] = sum_n PK[n,e]",
            "NUM[m,f] = PQ[m,e] * KV[e,f]",
            "DEN[m] = PQ[m,e] * KS[e]",
            "AV[m,f] = NUM[m,f] / DEN[m]", note="Katharopoulos et al., non-causal, phi = elu + 1")

LIGHTNING = _C("lightning",
               "BKV[e,f,n1] = K[n1,n0,e] * DK[n0] * V[n1,n0,f]",
               "RKV[e,f,n1+1] = RKV[e,f,n1] * L[] + BKV[e,f,n1]",
               "INTER[n1,m0,f] = Q[n1,m0,e] * DQ[m0] * RKV[e,f,n1]",
               "INTRA[n1,m0,f] = Q[n1,m0,e] * K[n1,n0,e] * D[m0,n0] * V[n1,n0,f]",
               "AV[n1,m0,f] = INTER[n1,m0,f] + INTRA[n1,m0,f]",
               note="Lightning: causal linear attention by chunks, a decayed running state between them")

LINFORMER = _C("linformer",
               "KP[k,e] = PE[k,n] * K[n,e]",
               "VP[k,f] = PF[k,n] * V[n,f]",
               "QK[m,k] = Q[m,e] * KP[k,e]",
               "GM[m] = max_k QK[m,k]",
               "SN[m,k] = exp(QK[m,k] - GM[m])",
               "SD[m] = sum_k SN[m,k]",
               "AV[m,f] = SN[m,k] * VP[k,f] / SD[m]", note="projected keys: every n-reduction first")

CATALOG: dict[str, EinsumCascade] = {c.name: c for c in (
    FUSEMAX_1, FUSEMAX_2, FUSEMAX_3, THREE_PASS, DEFERRED, LOCAL_MAX, ONLINE_SOFTMAX, UNSAFE_SOFTMAX,
    ONE_PASS, SPLIT_KV, SIGMOID, LINEAR, LIGHTNING, LINFORMER)}
