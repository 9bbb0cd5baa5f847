"""The tiny HF LLaVA fixture end to end: eval on a POPE parquet, agent training on JSONL, export, generate.

The fixture's weights are random, so scores are meaningless; what is checked is that every path runs
on the checkpoint's own tokenizer, processor and weights, that results carry the benchmark's scores
and the skipped rows, and that the exported bundle generates transformers' greedy tokens
(`ex{e}_greedy` of tests/fixtures/hf_llava_tiny/outputs.npz, prompt `<image>\\n{question}`).
"""

import functools
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from gripjax import checks
from gripjax import export
from gripjax import runtime
from gripjax.data import hf_data
from gripjax.data import user_data
from gripjax.eval import hf_eval
from gripjax.models import costs
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, 'tests', 'fixtures', 'hf_llava_tiny')
TEMPLATE = '<image>\n{question}'  # Only <bos> before the image: the layout [bos][visual][text].
CHAT = 'USER: <image>\n{question} ASSISTANT:'  # LLaVA-1.5's prompt: text before the image too.


@functools.lru_cache(maxsize=None)
def fixture_examples():
  with open(os.path.join(FIXTURE, 'examples.json')) as f:
    return json.load(f)['examples']  # [[skimage name, question], ...]


def get_config(**hf):
  spec = importlib.util.spec_from_file_location('llava_hf', os.path.join(REPO, 'configs', 'llava_hf.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(FIXTURE)
  c.hf.update({'template': TEMPLATE, 'text_len': 40, 'max_new_tokens': 1, **hf})
  c.eval.update(batch_size=4, budgets=(0.5,), position_modes=('keep',),
                methods=('full', 'blind', 'random', 'fastv'))
  c.train.update(batch_size=2, group_size=2, steps=2, warmup_steps=1, log_every=1, checkpoint_every=2)
  return checks.check_config(c)


def png(name, size=40) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(getattr(skimage.data, name)()).resize((size, size)).save(buf, 'PNG')
  return buf.getvalue()


def write_pope(path, n=4, images=None):
  images = images or [{'bytes': png(name), 'path': ''} for name in ('chelsea', 'coffee', 'rocket', 'astronaut')[:n]]
  pq.write_table(pa.table({
      'question_id': [str(i) for i in range(n)], 'question': ['Is there a cat in the image?'] * n,
      'answer': ['yes', 'no', 'no', 'yes'][:n], 'image_source': ['coco'] * n, 'image': images,
      'category': ['random', 'random', 'popular', 'popular'][:n]}), path)
  return path


def write_jsonl(tmp_path, answers=True, rows=None):
  rows = rows or [('chelsea', 'What color is the cat?', 'yes'), ('coffee', 'Is there a cup?', 'no'),
                  ('rocket', 'Is the rocket on the pad?', 'yes'), ('astronaut', 'Is it a person?', 'no')]
  lines = []
  for name, question, answer in rows:
    (tmp_path / f'{name}.png').write_bytes(png(name))
    row = {'image': f'{name}.png', 'question': question}
    if answers:
      row['answer'] = answer
    lines.append(json.dumps(row))
  path = tmp_path / ('qa.jsonl' if answers else 'unlabelled.jsonl')
  path.write_text('\n'.join(lines) + '\n')
  return str(path)


# The runs that compile a train step or the evaluation's many functions are subprocesses of
# gripjax.main, with helpers.FAST_XLA (it must be set before JAX starts).
COMMON = [f'--config=configs/llava_hf.py:{FIXTURE}', '--config.hf.text_len=40',
          '--config.hf.max_new_tokens=1', '--config.eval.batch_size=4', '--config.eval.budgets=(0.5,)',
          "--config.eval.position_modes=('keep',)", "--config.eval.methods=('full','blind','random','fastv')",
          '--config.train.batch_size=2', '--config.train.group_size=2', '--config.train.steps=2',
          '--config.train.warmup_steps=1', '--config.train.log_every=1', '--config.train.checkpoint_every=2']


def main(mode, workdir, *flags):
  """Runs `python -m gripjax.main --mode=MODE` on the fixture; returns the CompletedProcess."""
  env = helpers.subprocess_env()
  return subprocess.run([sys.executable, '-m', 'gripjax.main', f'--mode={mode}', f'--workdir={workdir}', *COMMON,
                         *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_eval_pope_every_pruner_with_benchmark_scores(tmp_path):
  # LLaVA-1.5's chat template (the config's default): <s> USER: before the image in every forward.
  data = write_pope(str(tmp_path / 'pope.parquet'))
  proc = main('eval', tmp_path / 'work', '--config.hf.benchmark=pope', f'--config.hf.data_path={data}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  work = tmp_path / 'work' / 'eval'
  rows = json.loads((work / 'results.json').read_text())
  by = {r['method']: r for r in rows}
  assert sorted(by) == ['blind', 'fastv', 'full', 'random']
  # N = 16 image tokens; rho = 0.5 keeps 8.
  assert by['full']['kept_tokens'] == 16 and by['random']['kept_tokens'] == 8 and by['fastv']['kept_tokens'] == 8
  for r in rows:
    assert r['n'] == 4 and set(r['per_task']) == {'popular', 'random'}
    assert r['skipped'] == {reason: 0 for reason in hf_data.SKIP_REASONS}
  # Pre-LM pruners and full generate and get POPE's scores; blind and in-LM FastV do not.
  for m in ('full', 'random'):
    gen = by[m]['generation']
    assert gen['benchmark'] == 'pope' and gen['n'] == 4 and gen['max_new_tokens'] == 1
    assert set(gen['scores']) >= {'all', 'average', 'random', 'popular', 'num_unparsed'}
  assert by['blind']['generation'] is None and by['fastv']['generation'] is None
  preds = [json.loads(l) for l in (work / 'predictions.jsonl').read_text().splitlines()]
  assert len(preds) == 2 * 4 and [p['answers'][0] for p in preds[:4]] == ['yes', 'no', 'no', 'yes']
  # Each row's POPE accuracy is the share of its written predictions that equal the answer after
  # lower().strip(), counted here from the predictions file.
  for m in ('full', 'random'):
    mine = [p for p in preds if p['method'] == m]
    want = sum(p['prediction'].strip().lower() == p['answers'][0] for p in mine) / 4
    assert by[m]['generation']['scores']['all']['accuracy'] == want
  # The first-token accuracy: 'yes' is one token (173), 'no' two (87, 31); with one generated token
  # a row is right exactly when its prediction is the text of the answer's first token.
  tok = hf_data.PromptTokenizer.from_config(get_config())
  first = {'yes': tok.decode([173]), 'no': tok.decode([87])}
  for m in ('full', 'random'):
    mine = [p for p in preds if p['method'] == m]
    assert by[m]['accuracy'] == sum(p['prediction'] == first[p['answers'][0]] for p in mine) / 4
  assert (work / 'report.md').exists() and '| full |' in (work / 'benchmark.md').read_text()
  # The FLOP columns count the 4 prefix slots (<s> USER: ): full's LM prefill runs 4 + 16 + 40 slots.
  c = get_config()
  vocab = runtime.vocab_size(c, tok)
  assert by['full']['prefill_flops'] == costs.prefill_flops(c, 16, 40, vocab, prefix_len=4)
  assert by['full']['prefill_flops'] > costs.prefill_flops(c, 16, 40, vocab)  # <bos> alone


def test_bad_rows_skipped_and_counted_or_named(tmp_path):
  good = {'bytes': png('chelsea'), 'path': ''}
  images = [good, {'bytes': b'not an image', 'path': ''}, good, {'bytes': None, 'path': 'absent.png'}]
  path = write_pope(str(tmp_path / 'pope.parquet'), images=images)
  c = get_config(benchmark='pope', data_path=path)
  tok = hf_data.PromptTokenizer.from_config(c)
  with pytest.raises(user_data.BadDataError, match=r'pope\.parquet row 1: unreadable image'):
    hf_data.load_data(c, tok)
  c.hf.skip_bad_rows = True
  data = hf_data.load_data(c, tok)
  assert [ex.row for ex in data.examples] == [0, 2]
  assert data.skip_counts() == {'missing_image': 1, 'unreadable_image': 1, 'missing_field': 0, 'malformed': 0,
                                'question_too_long': 0}
  # A prompt longer than text_len: POPE's prompt is 34 tokens after the image here.
  c.hf.update(text_len=30, skip_bad_rows=False, data_path=write_pope(str(tmp_path / 'good.parquet')))
  with pytest.raises(user_data.BadDataError, match=r"good\.parquet row 0 .*field 'question'.*34 tokens after "
                                                   r'the image.*config\.hf\.text_len=30'):
    hf_data.load_data(c, tok)
  c.hf.skip_bad_rows = True
  with pytest.raises(user_data.BadDataError, match=r'empty dataset: all 4 rows .* were bad'):
    hf_data.load_data(c, tok)
  # An empty file and a missing image file of a JSONL dataset.
  (tmp_path / 'empty.jsonl').write_text('\n')
  c = get_config(data_format='jsonl', data_path=str(tmp_path / 'empty.jsonl'))
  with pytest.raises(user_data.BadDataError, match=r'empty dataset: .*empty\.jsonl has no rows'):
    hf_data.load_data(c, tok)
  (tmp_path / 'missing.jsonl').write_text(json.dumps({'image': 'nowhere.png', 'question': 'q?'}) + '\n')
  c.hf.data_path = str(tmp_path / 'missing.jsonl')
  with pytest.raises(user_data.BadDataError, match=r"missing\.jsonl line 1: image file '.*/nowhere\.png' does not exist"):
    hf_data.load_data(c, tok)


def test_chat_template_training_batches_carry_the_prefix_and_other_architectures_refused(tmp_path):
  c = get_config(template=CHAT, data_format='jsonl', data_path=write_jsonl(tmp_path))
  tok = hf_data.PromptTokenizer.from_config(c)
  # <s> USER: and the space before the image: the model's prefix, passed to every forward.
  assert tok.layout_prefix.tolist() == tok.prefix_ids.tolist() and tok.prefix_ids[0] == 1
  assert tok.hf.decode(tok.prefix_ids, skip_special_tokens=False) == '<s> USER: '
  assert hf_data.PromptTokenizer.from_config(get_config()).layout_prefix is None  # <bos> alone
  # Training batches carry it (B, P) on every row, for the train step's forwards of the frozen VLM;
  # the question slots hold only the text after the image.
  data = hf_data.load_data(c, tok)
  batch = next(hf_data.batch_iterator(data, c, 2, seed=0, prefix_ids=tok.layout_prefix))
  np.testing.assert_array_equal(batch['prefix_ids'], [tok.prefix_ids.tolist()] * 2)
  assert batch['prefix_ids'].shape == (2, 4) and batch['prefix_valid'].all()
  assert batch['question_ids'].shape == (2, 40)
  row = batch['question_ids'][0][batch['question_valid'][0]]
  assert tok.hf.decode(row, skip_special_tokens=False).endswith(' ASSISTANT:')
  # Without a prefix (<bos> alone) the keys are left out: the model's default layout.
  assert 'prefix_ids' not in next(hf_data.batch_iterator(data, c, 2, seed=0))
  ckpt = tmp_path / 'qwen'
  shutil.copytree(FIXTURE, ckpt, ignore=shutil.ignore_patterns('*.safetensors', 'sharded', 'llama_tokenizer'))
  cfg = json.loads((ckpt / 'config.json').read_text())
  (ckpt / 'config.json').write_text(json.dumps(cfg | {'model_type': 'qwen2_vl'}))
  spec = importlib.util.spec_from_file_location('llava_hf', os.path.join(REPO, 'configs', 'llava_hf.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  with pytest.raises(ValueError, match=r"qwen/config\.json: config\.json has model_type='qwen2_vl': expected one "
                                       r"of \('llava',\)"):
    module.get_config(str(ckpt))


def test_batches_by_hand(tmp_path):
  c = get_config(data_format='jsonl', data_path=write_jsonl(tmp_path))
  tok = hf_data.PromptTokenizer.from_config(c)
  data = hf_data.load_data(c, tok)
  batch = next(hf_data.eval_batches(data, c, 3, num_examples=4))
  assert batch['pixels'].shape == (3, 32, 32, 3) and batch['pixels'].dtype == np.uint8
  assert batch['question_ids'].shape == (3, 40) and batch['region_mask'].shape == (3, 16)
  # 'yes' is one token (173) of the fixture's tokenizer, 'no' two (87, 31): answer_id is the first.
  np.testing.assert_array_equal(batch['answer_id'], [173, 87, 173])
  np.testing.assert_array_equal(batch['answer_len'], [1, 2, 1])
  # The text slots hold the template's ids after the image, as the fixture's input_ids end.
  ids = np.load(os.path.join(FIXTURE, 'outputs.npz'))['ex0_input_ids']  # <s>, 16 images, '\nWhat color ...'
  row = batch['question_ids'][0][batch['question_valid'][0]]
  np.testing.assert_array_equal(row, ids[17:])
  # Host 1 of 2 reads rows 2 and 3 only (contiguous shards), and its batches hold only those.
  shard = hf_data.load_data(c, tok, process_index=1, process_count=2)
  assert [ex.row for ex in shard.examples] == [2, 3] and shard.num_rows == 4
  local = next(hf_data.batch_iterator(shard, c, 2, seed=0))
  np.testing.assert_array_equal(np.sort(local['answer_id']), [87, 173])  # rows 2 ('yes') and 3 ('no')
  # The last of 4 rows in batches of 3: padded with row 3 again, marked invalid.
  last = list(hf_data.eval_batches(data, c, 3))[-1]
  np.testing.assert_array_equal(last['index'], [3, 3, 3])
  np.testing.assert_array_equal(last['valid'], [True, False, False])


def test_train_two_steps_with_and_without_answers_then_export_and_generate(tmp_path):
  # With answers: the first-answer-token log-probability reward (train.reward='logprob').
  data = write_jsonl(tmp_path)
  work = tmp_path / 'agent'
  proc = main('train_agent', work, '--config.hf.data_format=jsonl', f'--config.hf.data_path={data}',
              f'--config.hf.template={TEMPLATE}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  history = [json.loads(l) for l in (work / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], r['phase']) for r in history] == [(1, 0), (2, 1)]
  assert all(np.isfinite(r['loss']) for r in history)
  # Without answers: a labelled reward names the row; the label-free agreement reward trains.
  unlabelled = tmp_path / 'unlabelled'
  unlabelled.mkdir()
  data2 = write_jsonl(unlabelled, answers=False)
  c2 = get_config(data_format='jsonl', data_path=data2)
  rows = hf_data.load_data(c2, hf_data.PromptTokenizer.from_config(c2))
  with pytest.raises(user_data.BadDataError, match=r"unlabelled\.jsonl row 0 .*has no field 'answer'.*"
                                                   r"train\.reward='agreement'"):
    next(hf_data.batch_iterator(rows, c2, 2, seed=0))
  # This one with LLaVA-1.5's chat template: <s> USER: before the image in every forward of the step.
  proc = main('train_agent', tmp_path / 'agent2', '--config.hf.data_format=jsonl', f'--config.hf.data_path={data2}',
              f'--config.hf.template={CHAT}', '--config.train.reward=agreement')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert len((tmp_path / 'agent2' / 'metrics.jsonl').read_text().splitlines()) == 2

  # Export the first agent with each template; a bundle holds the HF tokenizer files (under its
  # checksums) and generates with its template. Every token kept (budget 1): the agent's top 16 of 16
  # is the whole image, so the greedy tokens are transformers' on that prompt.
  images = np.stack([hf_data.process_image(user_data.Example('', '', image=getattr(skimage.data, name)()),
                                           hf_data.image_processor(get_config())) for name, _ in fixture_examples()])
  questions = [q for _, q in fixture_examples()]
  want = np.load(os.path.join(FIXTURE, 'outputs.npz'))
  for template, key in ((TEMPLATE, 'greedy'), (CHAT, 'chat_greedy')):
    c = get_config(data_format='jsonl', data_path=data, template=template)
    c.export.dir = str(tmp_path / f'bundle_{key}')
    bundle_path = export.run(c, str(work))
    manifest = json.loads(open(os.path.join(bundle_path, 'bundle.json')).read())
    assert manifest['vocab'] is None and manifest['tokenizer'] == 'tokenizer' and manifest['vocab_size'] == 201
    assert {'tokenizer/tokenizer.json', 'tokenizer/tokenizer_config.json', 'tokenizer/config.json'} <= set(
        manifest['files'])
    bundle = export.load_bundle(bundle_path)
    assert bundle.config.hf.template == template
    with jax.default_matmul_precision('highest'):
      _, tokens = bundle.generate(images, questions, budget=1.0, max_new_tokens=6, return_tokens=True)
    for e in range(len(questions)):
      np.testing.assert_array_equal(tokens[e], want[f'ex{e}_{key}'], err_msg=f'example {e}, {key}')
  # A bundle whose tokenizer.json changed is refused, naming the file.
  with open(os.path.join(bundle_path, 'tokenizer', 'tokenizer.json'), 'a') as f:
    f.write(' ')
  with pytest.raises(export.BundleError, match=r'tokenizer/tokenizer\.json is damaged'):
    export.load_bundle(bundle_path)


def test_user_dataset_generations_scored_by_exact_match(tmp_path):
  c = get_config(data_format='jsonl', data_path=write_jsonl(tmp_path))
  data = hf_data.load_data(c, hf_data.PromptTokenizer.from_config(c))
  assert data.benchmark is None and data.task_names == ('all',)
  # References yes, no, yes, no: 'yes', 'No ' and 'no' match after lower().strip(); 'x' does not.
  assert hf_eval.score(data, ['yes', 'No ', 'x', 'no']) == {'exact_match': 0.75, 'num_rows': 4}
  assert hf_eval.score(data, ['no', 'yes', 'yes', 'no']) == {'exact_match': 0.5, 'num_rows': 4}
  assert hf_eval.score(data, ['yes', 'no']) == {'exact_match': 1.0, 'num_rows': 2}  # the first rows only
