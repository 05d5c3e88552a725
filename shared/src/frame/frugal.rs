//! A serde deserializer adapter that never allocates from an untrusted length prefix.
//!
//! bincode answers `deserialize_byte_buf` and `deserialize_string` by allocating the
//! declared length first (up to the configured limit, a gigabyte for frames) and only
//! then reading the bytes. A frame of a few bytes could so make a process allocate a
//! gigabyte. This adapter turns those calls into `deserialize_bytes` and
//! `deserialize_str`, which borrow from the input slice and fail before allocating
//! when the bytes are not there; the visitor then copies exactly what was read. It
//! also caps every sequence's size hint at the input length (each element takes at
//! least one byte), so a `Vec` never preallocates more elements than the frame can hold.
//!
//! It also refuses values nested deeper than [`MAX_NESTING`], so that a hostile frame
//! cannot exhaust the stack.
//!
//! Everything else is forwarded unchanged. It owns no I/O and knows no message type.

use std::fmt;

use serde::de::{
    DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};

/// Wraps a deserializer that reads from an input of `input_bytes` bytes.
pub(crate) struct Frugal<D> {
    pub(crate) inner: D,
    pub(crate) input_bytes: usize,
}

struct FrugalVisitor<V> {
    inner: V,
    input_bytes: usize,
}

struct FrugalSeed<S> {
    inner: S,
    input_bytes: usize,
}

struct FrugalAccess<A> {
    inner: A,
    input_bytes: usize,
}

impl<A> FrugalAccess<A> {
    /// `seed`, held to the same input size.
    fn seed<T>(&self, seed: T) -> FrugalSeed<T> {
        FrugalSeed {
            inner: seed,
            input_bytes: self.input_bytes,
        }
    }
}

impl<V> FrugalVisitor<V> {
    fn new(inner: V, input_bytes: usize) -> Self {
        FrugalVisitor { inner, input_bytes }
    }
}

macro_rules! forward_deserialize {
    ($($method:ident),* $(,)?) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
            self.inner.$method(FrugalVisitor::new(visitor, self.input_bytes))
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Frugal<D> {
    type Error = D::Error;

    forward_deserialize!(
        deserialize_any,
        deserialize_bool,
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_i128,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_u128,
        deserialize_f32,
        deserialize_f64,
        deserialize_char,
        deserialize_str,
        deserialize_bytes,
        deserialize_option,
        deserialize_unit,
        deserialize_seq,
        deserialize_map,
        deserialize_identifier,
        deserialize_ignored_any,
    );

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        // Borrow, then let the visitor copy what is really there.
        self.inner
            .deserialize_str(FrugalVisitor::new(visitor, self.input_bytes))
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.inner
            .deserialize_bytes(FrugalVisitor::new(visitor, self.input_bytes))
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.inner
            .deserialize_unit_struct(name, FrugalVisitor::new(visitor, self.input_bytes))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.inner
            .deserialize_newtype_struct(name, FrugalVisitor::new(visitor, self.input_bytes))
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.inner
            .deserialize_tuple(len, FrugalVisitor::new(visitor, self.input_bytes))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.inner.deserialize_tuple_struct(
            name,
            len,
            FrugalVisitor::new(visitor, self.input_bytes),
        )
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.inner
            .deserialize_struct(name, fields, FrugalVisitor::new(visitor, self.input_bytes))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.inner.deserialize_enum(
            name,
            variants,
            FrugalVisitor::new(visitor, self.input_bytes),
        )
    }

    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

macro_rules! forward_visit {
    ($($method:ident: $ty:ty),* $(,)?) => {$(
        fn $method<E: serde::de::Error>(self, value: $ty) -> Result<V::Value, E> {
            self.inner.$method(value)
        }
    )*};
}

impl<'de, V: Visitor<'de>> Visitor<'de> for FrugalVisitor<V> {
    type Value = V::Value;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        self.inner.expecting(formatter)
    }

    forward_visit!(
        visit_bool: bool,
        visit_i8: i8,
        visit_i16: i16,
        visit_i32: i32,
        visit_i64: i64,
        visit_i128: i128,
        visit_u8: u8,
        visit_u16: u16,
        visit_u32: u32,
        visit_u64: u64,
        visit_u128: u128,
        visit_f32: f32,
        visit_f64: f64,
        visit_char: char,
        visit_str: &str,
        visit_borrowed_str: &'de str,
        visit_string: String,
        visit_bytes: &[u8],
        visit_borrowed_bytes: &'de [u8],
        visit_byte_buf: Vec<u8>,
    );

    fn visit_none<E: serde::de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_none()
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<V::Value, D::Error> {
        self.inner.visit_some(Frugal {
            inner: deserializer,
            input_bytes: self.input_bytes,
        })
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<V::Value, D::Error> {
        self.inner.visit_newtype_struct(Frugal {
            inner: deserializer,
            input_bytes: self.input_bytes,
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        self.inner.visit_seq(FrugalAccess {
            inner: seq,
            input_bytes: self.input_bytes,
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.inner.visit_map(FrugalAccess {
            inner: map,
            input_bytes: self.input_bytes,
        })
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        self.inner.visit_enum(FrugalAccess {
            inner: data,
            input_bytes: self.input_bytes,
        })
    }
}

/// Most values nested in one another (elements, fields, variant payloads) a message
/// may have. Messages can nest (an EXEC carries requests; an answer holds arrays), so a
/// hostile frame could otherwise recurse until the decoder's stack overflows.
pub(crate) const MAX_NESTING: u32 = 64;

thread_local! {
    /// How deep the decoder of this thread is in nested values.
    static NESTING: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for FrugalSeed<S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<S::Value, D::Error> {
        let depth = NESTING.with(|nesting| nesting.get());
        if depth >= MAX_NESTING {
            return Err(serde::de::Error::custom(format!(
                "values nested more than {MAX_NESTING} deep"
            )));
        }
        NESTING.with(|nesting| nesting.set(depth + 1));
        let value = self.inner.deserialize(Frugal {
            inner: deserializer,
            input_bytes: self.input_bytes,
        });
        NESTING.with(|nesting| nesting.set(depth));
        value
    }
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for FrugalAccess<A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, A::Error> {
        self.inner.next_element_seed(self.seed(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner
            .size_hint()
            .map(|hint| hint.min(self.input_bytes))
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for FrugalAccess<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        self.inner.next_key_seed(self.seed(seed))
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        self.inner.next_value_seed(self.seed(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner
            .size_hint()
            .map(|hint| hint.min(self.input_bytes))
    }
}

impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for FrugalAccess<A> {
    type Error = A::Error;
    type Variant = FrugalAccess<A::Variant>;

    fn variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<(T::Value, Self::Variant), A::Error> {
        let input_bytes = self.input_bytes;
        let (value, variant) = self.inner.variant_seed(FrugalSeed {
            inner: seed,
            input_bytes,
        })?;
        Ok((
            value,
            FrugalAccess {
                inner: variant,
                input_bytes,
            },
        ))
    }
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for FrugalAccess<A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.inner.unit_variant()
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        let seed = self.seed(seed);
        self.inner.newtype_variant_seed(seed)
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        self.inner
            .tuple_variant(len, FrugalVisitor::new(visitor, self.input_bytes))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        self.inner
            .struct_variant(fields, FrugalVisitor::new(visitor, self.input_bytes))
    }
}

/// Deserializes a `T` through [`Frugal`]; a seed so that bincode reports the bytes it used.
pub(crate) struct FrugalDecode<T> {
    pub(crate) input_bytes: usize,
    pub(crate) message: std::marker::PhantomData<T>,
}

impl<'de, T: serde::Deserialize<'de>> DeserializeSeed<'de> for FrugalDecode<T> {
    type Value = T;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<T, D::Error> {
        T::deserialize(Frugal {
            inner: deserializer,
            input_bytes: self.input_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::frame::{decode_frame, encode_frame, Answer, ResponseEnvelope, WorkerResponse};

    fn nested(depth: usize) -> ResponseEnvelope {
        let mut answer = Answer::Integer(1);
        for _ in 0..depth {
            answer = Answer::Array(vec![answer]);
        }
        ResponseEnvelope {
            id: 1,
            response: WorkerResponse::Answer(answer),
        }
    }

    #[test]
    fn values_nested_too_deep_are_refused_before_the_stack_runs_out() {
        let mut frame = Vec::new();
        encode_frame(&nested(10), &mut frame).unwrap();
        let (decoded, _) = decode_frame::<ResponseEnvelope>(&frame).unwrap().unwrap();
        assert_eq!(decoded, nested(10));
        // Each level is an element and a variant payload; thousands of levels would
        // overflow the stack without the limit. The frame is made by hand (encoding so
        // deep a value would itself overflow): the bytes one more level adds, repeated.
        let payload = |depth| {
            let mut frame = Vec::new();
            encode_frame(&nested(depth), &mut frame).unwrap();
            frame.split_off(4)
        };
        let (one, two) = (payload(1), payload(2));
        let head = one.iter().zip(&two).take_while(|(a, b)| a == b).count();
        let level = &two[head..head + (two.len() - one.len())];
        let mut deep = one[..head].to_vec();
        for _ in 0..100_000 {
            deep.extend_from_slice(level);
        }
        deep.extend_from_slice(&one[head..]);
        let mut frame = (deep.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&deep);
        assert!(decode_frame::<ResponseEnvelope>(&frame).is_err());
    }
}
