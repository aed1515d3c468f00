"""The batch dict the model consumes: every field, its shape and meaning, in one place.

All shapes are static. B batch rows, S LLM positions at 5 Hz (a row may pack several
conversations, told apart by `segment_ids`), G = 5 speech codes per position, W mel windows
per row, F = window_frames mel frames per window, M mel bins.

| field              | shape        | dtype | meaning                                               |
|--------------------|--------------|-------|-------------------------------------------------------|
| input_ids          | (B, S)       | int32 | text token; at assistant audio positions the frame's  |
|                    |              |       | text token t_p (<|sil|> once the text has ended); at  |
|                    |              |       | user audio positions <|AUDIO|> (unused)               |
| positions          | (B, S)       | int32 | position inside the packed segment (RoPE)             |
| segment_ids        | (B, S)       | int32 | packed conversation number, 1, 2, ...; 0 is padding   |
| audio_mask         | (B, S)       | bool  | position embeds a speech group instead of a token     |
| continuous_mask    | (B, S)       | bool  | the group comes from the continuous encoder (user     |
|                    |              |       | audio); else from `speech_codes` (discrete path)      |
| text_mask          | (B, S)       | bool  | audio position that also carries its text token:      |
|                    |              |       | input (E(t_p) + G_p) / 2                              |
| speech_codes       | (B, S, G)    | int32 | the 5 codes grouped at a discrete audio position      |
|                    |              |       | (delay groups hold bos; pad elsewhere)                |
| mel                | (B, W, F, M) | float | log-mel windows of the row's user audio               |
| mel_lengths        | (B, W)       | int32 | valid frames in each window (0 for an unused window)  |
| continuous_frames  | (B, S, G)    | int32 | which encoder output frames (index into the row's     |
|                    |              |       | W*(F/2)//2 pooled frames: pairs of the windows' 50 Hz |
|                    |              |       | outputs joined in order) make this position's group;  |
|                    |              |       | -1 adds a zero frame (an audio's zero padding to a    |
|                    |              |       | multiple of 5)                                        |
| text_targets       | (B, S)       | int32 | text token predicted from this position; IGNORE_ID    |
| speech_targets     | (B, S, G)    | int32 | speech group predicted from this position (the next   |
|                    |              |       | position's codes; 5 x eos where the text says         |
|                    |              |       | <|audio_eos|>); IGNORE_ID where there is none         |

Targets are aligned with the position that predicts them (no shift inside the loss): hidden
state h_p predicts text t_{p+1} and speech group p+1.
"""

import numpy as np

IGNORE_ID = -100

FIELDS = {
    'input_ids': ('B', 'S'),
    'positions': ('B', 'S'),
    'segment_ids': ('B', 'S'),
    'audio_mask': ('B', 'S'),
    'continuous_mask': ('B', 'S'),
    'text_mask': ('B', 'S'),
    'speech_codes': ('B', 'S', 'G'),
    'mel': ('B', 'W', 'F', 'M'),
    'mel_lengths': ('B', 'W'),
    'continuous_frames': ('B', 'S', 'G'),
    'text_targets': ('B', 'S'),
    'speech_targets': ('B', 'S', 'G'),
}


def check(batch: dict, model_config) -> None:
  """Raises ValueError naming the field if the batch is missing a field or has a wrong shape."""
  missing = sorted(set(FIELDS) - set(batch))
  if missing:
    raise ValueError(f'batch is missing fields {missing}; expected {sorted(FIELDS)}')
  sizes = {'G': model_config.speech.group_size, 'F': model_config.encoder.window_frames,
           'M': model_config.encoder.num_mel_bins}
  for name, dims in FIELDS.items():
    shape = tuple(getattr(batch[name], 'shape', np.shape(batch[name])))
    if len(shape) != len(dims):
      raise ValueError(f'batch field {name!r}: expected dims {dims}, found shape {shape}')
    for dim, size in zip(dims, shape):
      if sizes.setdefault(dim, size) != size:
        raise ValueError(f'batch field {name!r} has shape {shape}: dim {dim} should be '
                         f'{sizes[dim]}')
