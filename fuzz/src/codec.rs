//! Structure-aware inputs: types that `arbitrary` builds from the fuzzer's bytes, and the
//! inverse, [`Encode`], which writes the bytes `Unstructured` turns back into the same value.
//! The seed generator uses it to write corpora of meaningful inputs; [`roundtrip`] checks that
//! the encoding is exact.
//!
//! The rules mirror arbitrary 1.x's (pinned by `fuzz/Cargo.lock`): integers are little-endian
//! and take their width, `bool` is one byte (bit 0), `Option` a `bool` then the value, `Vec` a
//! `true` byte before each element and a `false` byte after the last, arrays their elements,
//! and a derived enum a `u32` `x` choosing variant `(x * count) >> 32`.

use arbitrary::{Arbitrary, Unstructured};

/// Writes the bytes that `T::arbitrary` decodes back into `self`.
pub trait Encode {
    /// Appends the encoding.
    fn encode(&self, out: &mut Vec<u8>);
}

macro_rules! encode_int {
    ($($t:ty),*) => {$(
        impl Encode for $t {
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
encode_int!(u8, u16, u32, u64, i8, i16, i32, i64);

impl Encode for bool {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
}

impl<T: Encode> Encode for Option<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Some(v) => {
                true.encode(out);
                v.encode(out);
            }
            None => false.encode(out),
        }
    }
}

impl<T: Encode> Encode for Vec<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        for v in self {
            true.encode(out);
            v.encode(out);
        }
        false.encode(out);
    }
}

impl<T: Encode, const N: usize> Encode for [T; N] {
    fn encode(&self, out: &mut Vec<u8>) {
        for v in self {
            v.encode(out);
        }
    }
}

impl<T: Encode> Encode for Box<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        (**self).encode(out);
    }
}

/// The `u32` that makes a derived enum with `count` variants pick variant `index`.
pub fn variant_selector(index: u64, count: u64) -> u32 {
    // The smallest x with (x * count) >> 32 == index.
    let x = (index << 32).div_ceil(count);
    u32::try_from(x).unwrap_or(u32::MAX)
}

/// The bytes of a value.
pub fn to_bytes<T: Encode>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    value.encode(&mut out);
    out
}

/// Decodes a value the way the fuzz targets do (`arbitrary`, not `arbitrary_take_rest`).
pub fn from_bytes<'a, T: Arbitrary<'a>>(data: &'a [u8]) -> Option<T> {
    let mut u = Unstructured::new(data);
    T::arbitrary(&mut u).ok()
}

/// Encodes `value` and checks that it decodes to itself; returns the bytes.
pub fn roundtrip<T>(value: &T) -> Vec<u8>
where
    T: Encode + for<'a> Arbitrary<'a> + PartialEq + std::fmt::Debug,
{
    let bytes = to_bytes(value);
    let back: Option<T> = from_bytes(&bytes);
    assert_eq!(
        back.as_ref(),
        Some(value),
        "the seed encoding does not decode to itself"
    );
    bytes
}

/// A struct whose fields are all structure-aware: derives `Arbitrary` and [`Encode`].
#[macro_export]
macro_rules! fuzz_struct {
    (
        $(#[$m:meta])*
        pub struct $name:ident {
            $( $(#[$fm:meta])* $f:ident : $t:ty ),* $(,)?
        }
    ) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, arbitrary::Arbitrary)]
        pub struct $name {
            $( $(#[$fm])* pub $f: $t ),*
        }

        impl $crate::codec::Encode for $name {
            fn encode(&self, out: &mut Vec<u8>) {
                $( $crate::codec::Encode::encode(&self.$f, out); )*
            }
        }
    };
}

/// An enum of unit and struct-like variants: derives `Arbitrary` and [`Encode`].
#[macro_export]
macro_rules! fuzz_enum {
    (
        $(#[$m:meta])*
        pub enum $name:ident {
            $( $(#[$vm:meta])* $var:ident $( { $( $(#[$fm:meta])* $f:ident : $t:ty ),* $(,)? } )? ),* $(,)?
        }
    ) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, arbitrary::Arbitrary)]
        pub enum $name {
            $( $(#[$vm])* $var $( { $( $(#[$fm])* $f: $t ),* } )? ),*
        }

        impl $crate::codec::Encode for $name {
            #[allow(unused_assignments, unused_variables)]
            fn encode(&self, out: &mut Vec<u8>) {
                let names: &[&str] = &[$(stringify!($var)),*];
                let count = names.len() as u64;
                let mut index = 0u64;
                $(
                    if let $name::$var $( { $($f),* } )? = self {
                        $crate::codec::Encode::encode(
                            &$crate::codec::variant_selector(index, count),
                            out,
                        );
                        $( $( $crate::codec::Encode::encode($f, out); )* )?
                        return;
                    }
                    index += 1;
                )*
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::fuzz_enum! {
        pub enum E {
            A,
            B { x: u32, y: Option<u8> },
            C { v: Vec<u16> },
            D,
            F,
        }
    }

    crate::fuzz_struct! {
        pub struct S {
            a: u8,
            e: Vec<E>,
            t: [u64; 2],
            b: bool,
        }
    }

    #[test]
    fn encodings_decode_to_themselves() {
        for count in 1..40u64 {
            for index in 0..count {
                let x = variant_selector(index, count);
                assert_eq!((u64::from(x) * count) >> 32, index);
            }
        }
        let s = S {
            a: 7,
            e: vec![
                E::A,
                E::B { x: 9, y: Some(3) },
                E::C { v: vec![1, 2] },
                E::D,
                E::F,
                E::B { x: 1, y: None },
            ],
            t: [u64::MAX, 5],
            b: true,
        };
        roundtrip(&s);
    }
}
