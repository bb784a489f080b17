"""`LipkitDualEncoderModel`: transformers' `VisionTextDualEncoderModel` with the text pooling a lipkit model
was trained with. lipkit copies this file into every folder it exports with `lipkit checkpoint convert
--to hf` for a timm image tower and a Hugging Face text tower; `config.json`'s `auto_map` names it, so
`transformers.AutoModel.from_pretrained(folder, trust_remote_code=True)` loads it, offline.

It reads the same weights as the stock class and differs in one place, the text pooling: the stock class
takes `tanh(pooler.dense(h[:, 0]))` (BERT's pooler on the first token), this one takes
`pooler.dense(pool(h))`, with `pool` lipkit's (`config.lipkit_text_pool`: "mean", the mean over the
attention mask, or "cls", the first token) and no tanh. lipkit writes `pooler.dense` as 2**-14 times the
identity (bias 0) and `text_projection` scaled by 2**14: powers of two, so the scalings add no rounding.

Only `torch` and `transformers` are imported: the file runs without lipkit installed.
"""

from __future__ import annotations

import torch
from transformers import VisionTextDualEncoderModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPOutput


class LipkitDualEncoderModel(VisionTextDualEncoderModel):
    """VisionTextDualEncoderModel whose text features pool as the lipkit model did (see the module notes).

    Without an `attention_mask`, padding is every `config.lipkit_pad_id` (the tokenizer's pad id), as lipkit
    masks it.
    """

    def _text_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is not None:
            return attention_mask
        pad = getattr(self.config, "lipkit_pad_id", self.config.text_config.pad_token_id)
        return (input_ids != pad).long()

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """The text model's output with `pooler_output` set to the projected text features (not
        normalised), as the stock class returns them."""
        mask = self._text_mask(input_ids, attention_mask)
        kwargs.pop("return_dict", None)
        out = self.text_model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            token_type_ids=token_type_ids,
            return_dict=True,
            **kwargs,
        )
        hidden = out.last_hidden_state
        if getattr(self.config, "lipkit_text_pool", "mean") == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        out.pooler_output = self.text_projection(self.text_model.pooler.dense(pooled))
        return out

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        token_type_ids: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CLIPOutput | tuple:
        """As the stock class's forward (normalised embeddings, logits scaled by exp(logit_scale), the
        contrastive loss on request), with this class's text features."""
        vision = self.vision_model(
            pixel_values=pixel_values, output_hidden_states=output_hidden_states, return_dict=True
        )
        image_embeds = self.visual_projection(vision.pooler_output)
        text = self.get_text_features(
            input_ids,
            attention_mask,
            position_ids,
            token_type_ids,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = text.pooler_output / text.pooler_output.norm(dim=-1, keepdim=True)
        logits_per_text = text_embeds @ image_embeds.t() * self.logit_scale.exp()
        loss = None
        if return_loss:
            target = torch.arange(len(logits_per_text), device=logits_per_text.device)
            loss = (
                torch.nn.functional.cross_entropy(logits_per_text, target)
                + torch.nn.functional.cross_entropy(logits_per_text.t(), target)
            ) / 2
        output = CLIPOutput(
            loss=loss,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text,
            vision_model_output=vision,
        )
        return output.to_tuple() if return_dict is False else output
