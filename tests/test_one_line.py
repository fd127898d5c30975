"""One statement converts a model whose own forward loops over its layers: `model.model.layers =
BDIAStack(model.model.layers, config)`. Hugging Face models from small random-init configs (no network):
GPT-2, Qwen2 (full and sliding-window layers), BERT, T5 (encoder and decoder, the position bias that
layer 0 returns) and ViT. For each: (a) at eval with bits None the unconverted model bit for bit
(generate() too); (b) one training step with dropout: reversible gradients as stored BDIA's;
(c) what backward uses flat in depth; (d) AdamW steps in which every x_0 is rebuilt bit for bit.
Then what users do with such a model: a cache in training, gradient checkpointing, other outputs
that need grad, slices, a layer run twice, hidden states, LoRA from peft, HF's Trainer."""

import os
import sys
import warnings

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bdia  # noqa: E402
from bdia import BDIAConfig, BDIAStack  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

IDS = torch.randint(3, 50, (2, 10), generator=torch.Generator().manual_seed(1))
PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
SMALL = dict(vocab_size=50, bos_token_id=0, eos_token_id=1, pad_token_id=2, attn_implementation="eager")


def gpt2(depth):
    config = transformers.GPT2Config(n_positions=32, n_embd=32, n_layer=depth, n_head=4, **SMALL)  # dropouts 0.1
    return transformers.GPT2LMHeadModel(config)


def qwen2(depth):
    types = ["full_attention", "sliding_attention"] * depth  # two masks: each layer gets its own
    config = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=depth, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32, attention_dropout=0.1,
                                      use_sliding_window=True, sliding_window=4, layer_types=types[:depth], **SMALL)
    return transformers.Qwen2ForCausalLM(config)


def bert(depth):
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=depth, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, **SMALL)  # dropouts 0.1
    return transformers.BertForMaskedLM(config)


def t5(depth):
    config = transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=depth, num_heads=4, dropout_rate=0.1,
                                   relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                   decoder_start_token_id=0, **SMALL)
    return transformers.T5ForConditionalGeneration(config)


def vit(depth):
    config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=depth,
                                    num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.1,
                                    attention_probs_dropout_prob=0.1, num_labels=3)
    return transformers.ViTForImageClassification(config)


MODELS = {  # how to build it, where its layers are, its training loss
    "gpt2": (gpt2, ["transformer.h"], lambda m: m(IDS, labels=IDS).loss),
    "qwen2": (qwen2, ["model.layers"], lambda m: m(IDS, labels=IDS).loss),
    "bert": (bert, ["bert.encoder.layer"], lambda m: m(IDS, labels=IDS).loss),
    "t5": (t5, ["encoder.block", "decoder.block"], lambda m: m(IDS, labels=IDS.flip(1)).loss),
    "vit": (vit, ["vit.layers"], lambda m: m(PIXELS, labels=torch.tensor([0, 2])).loss),
}


def build(name, depth, seed=0):
    torch.manual_seed(seed)
    return MODELS[name][0](depth)


def convert(model, name, config):
    """The one statement, for each stack of layers the model has."""
    for path in MODELS[name][1]:
        parent, attribute = model.get_submodule(path.rpartition(".")[0]), path.rpartition(".")[2]
        setattr(parent, attribute, BDIAStack(getattr(parent, attribute), config))


def set_config(model, config):
    for module in model.modules():
        if isinstance(module, BDIAStack):
            module.config = config


def outputs(model, name):
    if name == "vit":
        return model(PIXELS).logits
    if name == "t5":
        return model(IDS, decoder_input_ids=IDS.flip(1)).logits
    return model(IDS).logits


def step(model, loss_of, config, seed=5):
    """One training step's loss and gradients under this config, the same random draws for each."""
    set_config(model, config)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = loss_of(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_gradients_as_stored(model, loss_of):
    """(b): the same loss bit for bit, every gradient within 1e-5 of stored BDIA's (plus 1e-8 for gradients that
    are zero but for float rounding: the keys' bias, which softmax does not see)."""
    (loss_r, grads_r), (loss_s, grads_s) = [step(model, loss_of, BDIAConfig(reversible=r)) for r in (True, False)]
    assert torch.equal(loss_r, loss_s)
    assert grads_r.keys() == grads_s.keys() and len(grads_s) == sum(p.requires_grad for p in model.parameters())
    for key, grad in grads_s.items():
        assert (grads_r[key] - grad).norm() <= 1e-5 * grad.norm() + 1e-8, key


# ----------------------------------------------------------------------------- (a) to (d), each model


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_model_is_the_unconverted_one_at_eval_and_keeps_its_layers(name):
    model = build(name, 3).eval()
    keys, plain = list(model.state_dict()), outputs(model, name)
    layers = [model.get_submodule(f"{path}.1") for path in MODELS[name][1]]
    convert(model, name, BDIAConfig(bits=None, reversible=False))
    assert list(model.state_dict()) == keys
    assert [model.get_submodule(f"{path}.1") for path in MODELS[name][1]] == layers  # the same modules
    assert torch.equal(outputs(model, name), plain)  # (25) with bits None: bit for bit
    twin = build(name, 3, seed=1).eval()
    model.load_state_dict(twin.state_dict())  # an unconverted model's weights load, and back
    assert torch.equal(outputs(model, name), outputs(twin, name))
    twin.load_state_dict(build(name, 3).state_dict())
    model.load_state_dict(twin.state_dict())
    assert torch.equal(outputs(model, name), plain)
    set_config(model, BDIAConfig())  # l = 9: the stream on the grid, not far from the plain model
    assert not torch.equal(outputs(model, name), plain) and (outputs(model, name) - plain).abs().max() < 0.05


@pytest.mark.parametrize("name", ["gpt2", "qwen2", "t5"])
def test_generate_with_its_kv_cache_gives_the_unconverted_tokens(name):
    model = build(name, 2).eval()
    prompt = IDS[:, :4]
    plain = model.generate(prompt, max_new_tokens=6, do_sample=False)
    convert(model, name, BDIAConfig(bits=None, reversible=False))
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), plain)


@pytest.mark.parametrize("name", list(MODELS))
def test_one_training_step_reversible_gradients_are_stored_bdias(name):
    model = build(name, 3).train()
    convert(model, name, BDIAConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the KV cache warning of the causal LMs
        assert_gradients_as_stored(model, MODELS[name][2])


def kept_for_backward(model, name):
    """Bytes that backward unpacks of what the forward saved, each storage once, parameters aside."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    used = {}

    def unpack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            used[storage.data_ptr()] = storage.nbytes()
        return t

    torch.manual_seed(5)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = MODELS[name][2](model)
    loss.backward()
    return sum(used.values())


@pytest.mark.parametrize("name", list(MODELS))
def test_what_backward_uses_is_flat_in_depth(name):
    """(c): from 2 to 8 layers, reversible BDIA's growth is at most 5 % of stored BDIA's."""
    kept = {}
    for reversible in (True, False):
        for depth in (2, 8):
            model = build(name, depth).train()
            convert(model, name, BDIAConfig(reversible=reversible))
            kept[reversible, depth] = kept_for_backward(model, name)
    assert kept[False, 8] - kept[False, 2] > 0
    assert kept[True, 8] - kept[True, 2] <= 0.05 * (kept[False, 8] - kept[False, 2]), kept


@pytest.mark.parametrize("name", list(MODELS))
def test_adamw_steps_rebuild_every_x0_bit_for_bit(name, monkeypatch):
    """(d): the x_0 each stack's backward rebuilds by (24) is the forward's, at every step."""
    model = build(name, 3).train()
    convert(model, name, BDIAConfig())
    forward_x0, rebuilt_x0 = [], []
    for path in MODELS[name][1]:
        model.get_submodule(f"{path}.0").register_forward_pre_hook(
            lambda m, args: forward_x0.append(bdia.quantize(args[0], 9).detach()))
    rebuild = bdia.Tape.rebuild
    monkeypatch.setattr(bdia.Tape, "rebuild", lambda tape, k, x: (k == 0 and rebuilt_x0.append(x), rebuild(tape, k, x)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(4):
            loss = MODELS[name][2](model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert len(forward_x0) == len(rebuilt_x0) == 4 * len(MODELS[name][1])
    for before, again in zip(forward_x0, order_as_forward(rebuilt_x0, len(MODELS[name][1]))):
        assert torch.equal(before, again)
    assert losses[-1] < losses[0]


def order_as_forward(rebuilt, stacks):
    """Backward rebuilds the stacks' x_0 in reverse order (T5: decoder first, then encoder)."""
    return [x for i in range(0, len(rebuilt), stacks) for x in reversed(rebuilt[i : i + stacks])]


# ----------------------------------------------------------------------------- what users do with such a model


def test_a_kv_cache_in_training_is_left_out_with_a_warning_and_a_filled_one_is_refused():
    """Causal LMs build a cache in training (use_cache=True from their config): the forward would write
    each layer's keys into it and the recomputation attend to them twice. Reversible BDIA passes the
    layers no cache, as Hugging Face's gradient checkpointing does; the gradients are those of a run
    with use_cache=False. A cache that holds tokens already (a prefix) is refused."""
    model = build("qwen2", 3).train()
    convert(model, "qwen2", BDIAConfig())
    grads = []
    for use_cache in (True, False):
        model.zero_grad()
        torch.manual_seed(5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(IDS, labels=IDS, use_cache=use_cache).loss.backward()
        said = [str(w.message) for w in caught if "BDIA" in str(w.message)]
        assert said == (["BDIA: reversible training runs the layers without their KV cache; pass use_cache=False to "
                         "the model in training"] * 3 if use_cache else [])
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model.eval()(IDS[:, :3], cache=cache, use_cache=True)  # a prefix, then training on
    with pytest.raises(bdia.BDIAError, match="layer 0 got a KV cache that holds tokens already.*use_cache=False"):
        model.train()(IDS, cache=cache, use_cache=True)


def test_gradient_checkpointing_on_a_converted_model_is_refused_when_reversible():
    model = build("gpt2", 3).train()
    convert(model, "gpt2", BDIAConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable()
    with pytest.raises(bdia.BDIAError, match=r"layer 0 is gradient-checkpointed.*"
                                             r"model.gradient_checkpointing_disable\(\)"):
        model(IDS, labels=IDS)
    stored = step(model, MODELS["gpt2"][2], BDIAConfig(reversible=False))  # stored BDIA: checkpointing saves memory there
    model.gradient_checkpointing_disable()
    plain = step(model, MODELS["gpt2"][2], BDIAConfig(reversible=False))
    assert torch.equal(stored[0], plain[0])


class OwnLoop(nn.Module):
    """A model whose forward loops over its layers as Hugging Face's do: a slice of them, per-layer
    arguments, layers that return other outputs; `order` says which layers run (one twice, or fewer)."""

    def __init__(self, depth, order=None):
        super().__init__()
        self.embed, self.head = nn.Linear(3, 16), nn.Linear(16, 2)
        self.layers = nn.ModuleList(Layer(16) for _ in range(depth))
        self.order = order

    def forward(self, x):
        x, aux = self.embed(x), 0.0
        layers = self.layers[:] if self.order is None else [self.layers[i] for i in self.order]
        for i, layer in enumerate(layers):
            x, extra = layer(x, torch.full((16,), 1.0 + i))  # a per-layer argument
            aux = aux + extra.square().mean()
        return self.head(x).square().mean() + aux


class Layer(nn.Module):
    """Returns (x + h(x), a tensor that requires grad): a layer output beyond the first."""

    def __init__(self, dim):
        super().__init__()
        self.norm, self.fc, self.gate = nn.LayerNorm(dim), nn.Linear(dim, dim), nn.Parameter(torch.ones(dim))

    def forward(self, x, scale):
        h = torch.nn.functional.dropout(self.fc(self.norm(x)), 0.1, self.training) * scale / scale.mean()
        return x + h, self.gate * h.mean()


def own_loop_gradients(model, config, x):
    model.layers.config = config
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    loss = model(x)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("order", [None, [0, 1], [0, 1, 1, 2], [0, 1, 2, 0, 1, 2]])
def test_other_outputs_that_need_grad_fewer_layers_or_one_twice_train_as_stored(order):
    torch.manual_seed(0)
    model, x = OwnLoop(3, order).train(), torch.randn(4, 5, 3)
    model.layers = BDIAStack(model.layers, BDIAConfig())
    (loss_r, grads_r), (loss_s, grads_s) = [own_loop_gradients(model, BDIAConfig(reversible=r), x) for r in (True, False)]
    assert torch.equal(loss_r, loss_s) and grads_r.keys() == grads_s.keys()
    assert ("layers.2.gate" in grads_s) == (order != [0, 1])  # the gates get their gradient through the extra output
    for key, grad in grads_s.items():
        assert (grads_r[key] - grad).norm() <= 1e-5 * grad.norm(), key


def test_output_hidden_states_are_the_bdia_stream_and_train_as_stored():
    """Each hidden state Hugging Face records (a hook on each layer) is the stream x_k: on the 2^-9 grid
    and as many as without BDIA; all are kept, so memory grows with depth as without BDIA."""
    model = build("gpt2", 3).train()
    convert(model, "gpt2", BDIAConfig())
    torch.manual_seed(5)
    states = model(IDS, output_hidden_states=True, use_cache=False).hidden_states
    assert len(states) == 4 and all(torch.equal(bdia.quantize(s, 9), s) for s in states[1:-1])
    assert_gradients_as_stored(model, lambda m: sum(
        s.square().mean() for s in m(IDS, output_hidden_states=True, use_cache=False).hidden_states))


def test_lora_adapters_from_peft_on_converted_layers_train_as_stored():
    peft = pytest.importorskip("peft")
    model = build("gpt2", 3).train()
    convert(model, "gpt2", BDIAConfig())
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.1, fan_in_fan_out=True)
    model = peft.get_peft_model(model, lora)  # the base weights frozen, the embeddings too: x needs no grad
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert_gradients_as_stored(model, lambda m: m(input_ids=IDS, labels=IDS, use_cache=False).loss)


class Flaky(Layer):
    """Not deterministic where the engine cannot see it: its second call differs from its first."""

    def forward(self, x, scale):
        self.calls = getattr(self, "calls", 0) + 1
        out, extra = super().forward(x, scale)
        return out + 1e-3 * self.calls, extra


def test_the_recomputation_is_checked_when_the_lowest_layers_need_no_gradient():
    """Frozen embeddings and lower layers: their backward never runs, so the check of every recomputed
    h_k and of the lowest rebuilt x_k runs at the lowest layer that trains; a layer that recomputes
    otherwise is caught there."""
    for flaky in (False, True):
        torch.manual_seed(0)
        model = OwnLoop(4).train()
        if flaky:
            model.layers[2] = Flaky(16)
        model.layers = BDIAStack(model.layers, BDIAConfig())
        for part in (model.embed, model.layers[0], model.layers[1]):
            part.requires_grad_(False)
        if not flaky:
            x = torch.randn(4, 5, 3)
            (_, grads_r), (_, grads_s) = [own_loop_gradients(model, BDIAConfig(reversible=r), x) for r in (True, False)]
            assert grads_r.keys() == grads_s.keys() and "layers.1.fc.weight" not in grads_s
            assert all((grads_r[k] - g).norm() <= 1e-5 * g.norm() for k, g in grads_s.items())
            continue
        loss = model(torch.randn(4, 5, 3))
        with pytest.raises(bdia.ReconstructionError, match=r"recomputed h_2 \(block 2\)"):
            loss.backward()


def test_hugging_faces_trainer_trains_the_converted_model(tmp_path):
    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"input_ids": IDS[i % 2], "labels": IDS[i % 2]}

    pytest.importorskip("accelerate")
    model = build("gpt2", 2)
    convert(model, "gpt2", BDIAConfig())
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[],
                                          use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Batches())
        trainer.train()
    assert [log["step"] for log in trainer.state.log_history if "loss" in log] == [1, 2, 3]
    assert model.transformer.h.chain.tape is not None  # the last pass was reversible BDIA training


# ----------------------------------------------------------------------------- refused, with one line


def test_what_a_models_own_loop_cannot_do_exactly_is_refused_with_one_line():
    torch.manual_seed(0)
    layers = BDIAStack([Layer(16) for _ in range(3)], BDIAConfig()).train()
    x, scale = torch.randn(2, 5, 16), torch.ones(16)
    with pytest.raises(bdia.BDIAError, match=r"layer 0 \(Layer\) got no hidden state as its first positional"):
        layers[0](x=x, scale=scale)
    x1 = layers[0](x, scale)[0]
    with pytest.raises(bdia.BDIAError, match=r"layer 1 \(Layer\) got a hidden state that is not the previous layer's"):
        layers[1](x1 * 2, scale)  # the model changes the stream between layers
    layers[1].eval()
    with pytest.raises(ValueError, match=r"layer 1 \(Layer\) is in another mode than the layers before it"):
        layers[1](x1, scale)
    with pytest.raises(ValueError, match="some blocks are in training mode, some in eval mode"):
        layers[0](x, scale)
    layers[1].train().compile()
    with pytest.raises(bdia.BDIAError, match=r"layer 1 \(Layer\) is compiled or sharded.*run_blocks"):
        layers[1](x1, scale)
    plain = [Layer(16) for _ in range(2)]
    outside = BDIAStack(plain, BDIAConfig(bits=None, reversible=False)).eval()
    assert torch.equal(outside[1](x, scale)[0], plain[1].__class__.forward(plain[1], x, scale)[0])  # (25) needs no chain


# ----------------------------------------------------------------------------- the README's script


def test_the_readmes_one_line_script_runs_as_written(tmp_path, monkeypatch, capsys):
    """The first code block of README's "BDIA in your own model", run as it is there: it trains three
    steps, generates, and saves a checkpoint whose keys are an unconverted GPT-2's."""
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("## BDIA in your own model")[1].split("\n## ")[0]
    script = section.split("```python")[1].split("```")[0]
    assert "BDIAStack(model.transformer.h, BDIAConfig())" in script
    monkeypatch.chdir(tmp_path)
    takes, take = [], bdia.Tape.take
    monkeypatch.setattr(bdia.Tape, "take", lambda tape, k: (takes.append(k), take(tape, k))[1])
    torch.manual_seed(0)
    namespace = {"__name__": "readme_one_line"}
    exec(compile(script, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    losses = [float(line.split()[-1]) for line in printed.splitlines() if line.startswith("step ")]
    assert len(losses) == 3 and losses[2] < losses[0]
    assert takes == [3, 2, 1, 0] * 3  # three reversible backward passes, each from the top layer down
    plain = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "bdia-gpt2")  # loads as the standard model
    assert list(plain.state_dict()) == list(namespace["model"].state_dict())


def test_a_compiled_converted_model_trains_as_the_eager_one(monkeypatch):
    """torch.compile(model) on a converted model (aot_eager: dynamo and AOTAutograd, no code generation): each
    layer's BDIA step runs outside the compiled graphs (a graph break), eagerly both in the forward and in the
    backward's recomputation, so the losses and gradients are the eager model's bit for bit."""
    takes, take = [], bdia.Tape.take
    monkeypatch.setattr(bdia.Tape, "take", lambda tape, k: (takes.append(k), take(tape, k))[1])
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        model = build("gpt2", 3).train()
        convert(model, "gpt2", BDIAConfig())
        net = torch.compile(model, backend="aot_eager") if compiled else model
        torch.manual_seed(5)
        loss = net(IDS, labels=IDS, use_cache=False).loss
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    assert takes == [2, 1, 0] * 2  # reversible both times
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_a_stream_beyond_the_grid_is_refused_at_the_first_backward_of_a_models_own_loop():
    """run_blocks checks |x_k| after its forward; a model's own loop does not say where its last layer is,
    so the same check runs at the top layer's backward, before any x_k is rebuilt."""
    torch.manual_seed(0)
    model = OwnLoop(3).train()
    model.layers = BDIAStack(model.layers, BDIAConfig())
    model.embed.bias.data[0] = 2.0**15  # float32 holds the 2^-9 grid below 2^14
    loss = model(torch.randn(4, 5, 3))
    with pytest.raises(bdia.PrecisionError, match=r"input of the stack \(x_0\).*fewer bits"):
        loss.backward()
