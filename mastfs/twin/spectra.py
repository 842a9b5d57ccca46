"""What the twin's spectra show: a MIRI LRS-like spectrum of a knot in NGC 3132's shell (dust and stellar
continuum plus the nebula's emission lines at their rest wavelengths), dispersed on a detector, rectified
in a 2-D spectrum (s2d) and extracted to a 1-D spectrum (x1d), deterministic and rendered per byte range.

- `Spectrum`: flux density (Jy) of the source per wavelength: a 140 K dust blackbody plus the central
  star's Rayleigh-Jeans tail, and Gaussian lines of the instrument's resolution (R = lambda / FWHM, 40 at
  5 um to 160 at 14 um, as LRS).
- `SpectralScene(field, spectrum, trace, rows, seed)`: a `Sky` whose images are a slit spectrum: the
  wavelength grows along the rows `rows` (fractions of the image height), the source is a Gaussian
  across the slit at column fraction `trace`, on the thermal background of its wavelength (MJy/sr).
  SCI, ERR, DQ, VAR_* follow `SkyPlane`'s rules; a WAVELENGTH extension gives each pixel's wavelength.
- `x1d_records(scene, wcs)`: the EXTRACT1D table of an s2d of `scene` under `wcs`, extracted as the JWST
  pipeline's extract_1d does (sum over an aperture of +-3 sigma around the trace, background the mean of
  the columns beyond 4 sigma), from the s2d's own noisy SCI and variances: the x1d is the s2d's spectrum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mastfs.twin.sky import Band, Field, Sky, SkyPlane, Wcs

LINES: tuple[tuple[str, float, float], ...] = (
    ("H2 0-0 S(7)", 5.5112, 0.10),
    ("H2 0-0 S(6)", 6.1086, 0.06),
    ("H2 0-0 S(5)", 6.9095, 0.25),
    ("[Ar II]", 6.9853, 0.20),
    ("Pf alpha", 7.4599, 0.12),
    ("H2 0-0 S(4)", 8.0250, 0.12),
    ("[Ar III]", 8.9914, 0.45),
    ("H2 0-0 S(3)", 9.6649, 0.35),
    ("[S IV]", 10.5105, 0.60),
    ("H2 0-0 S(2)", 12.2786, 0.15),
    ("Hu alpha", 12.3719, 0.05),
    ("[Ne II]", 12.8135, 0.50),
)
"""(species, rest wavelength in um, peak flux density in mJy) of the lines a planetary nebula's shell
shows between 5 and 14 um (molecular hydrogen, low-ionisation metals, hydrogen recombination)."""

X1D_COLUMNS: tuple[tuple[str, str, str | None], ...] = (
    ("WAVELENGTH", "D", "um"),
    ("FLUX", "D", "Jy"),
    ("FLUX_ERROR", "D", "Jy"),
    ("FLUX_VAR_POISSON", "D", "Jy^2"),
    ("FLUX_VAR_RNOISE", "D", "Jy^2"),
    ("FLUX_VAR_FLAT", "D", "Jy^2"),
    ("SURF_BRIGHT", "D", "MJy/sr"),
    ("SB_ERROR", "D", "MJy/sr"),
    ("SB_VAR_POISSON", "D", "MJy^2/sr^2"),
    ("SB_VAR_RNOISE", "D", "MJy^2/sr^2"),
    ("SB_VAR_FLAT", "D", "MJy^2/sr^2"),
    ("DQ", "J", None),
    ("BACKGROUND", "D", "MJy/sr"),
    ("BKGD_ERROR", "D", "MJy/sr"),
    ("BKGD_VAR_POISSON", "D", "MJy^2/sr^2"),
    ("BKGD_VAR_RNOISE", "D", "MJy^2/sr^2"),
    ("BKGD_VAR_FLAT", "D", "MJy^2/sr^2"),
    ("NPIXELS", "D", None),
)
"""The EXTRACT1D columns of a JWST x1d file, with their TFORM and TUNIT."""

_APERTURE_SIGMAS = 3.0
_BACKGROUND_SIGMAS = 4.0
_SLIT_SIGMA_ARCSEC = 0.33  # the knot's width across the slit (about 3 MIRI pixels)
_H, _C, _K = 6.62607015e-34, 2.99792458e8, 1.380649e-23


@dataclass(frozen=True)
class Spectrum:
    """The source's flux density (Jy) between `low` and `high` um."""

    low: float = 4.8
    high: float = 14.0
    dust_mjy: float = 0.08  # dust continuum at 10 um
    dust_kelvin: float = 140.0
    star_mjy: float = 0.04  # the central star's Rayleigh-Jeans tail at 10 um

    @staticmethod
    def resolution(microns: np.ndarray) -> np.ndarray:
        """Resolving power lambda / FWHM at these wavelengths (LRS-like: 40 at 5 um, 160 at 14 um)."""
        return 40.0 + 13.3 * (microns - 5.0)

    def continuum(self, microns: np.ndarray) -> np.ndarray:
        """Flux density (Jy) without the lines."""
        def planck(lam: np.ndarray) -> np.ndarray:  # B_nu up to a constant
            metres = lam * 1e-6
            return 1.0 / (metres ** 3 * np.expm1(_H * _C / (metres * _K * self.dust_kelvin)))
        dust = self.dust_mjy * planck(microns) / planck(np.array(10.0))
        return 1e-3 * (dust + self.star_mjy * (microns / 10.0) ** -2)

    def flux(self, microns: np.ndarray) -> np.ndarray:
        """Flux density (Jy): continuum plus every line of LINES, Gaussians of the local resolution."""
        total = self.continuum(microns)
        for _, rest, peak_mjy in LINES:
            sigma = rest / self.resolution(np.array(rest)) / 2.3548
            total = total + 1e-3 * peak_mjy * np.exp(-0.5 * ((microns - rest) / sigma) ** 2)
        return total


def thermal_background(microns: np.ndarray) -> np.ndarray:
    """Sky and telescope background (MJy/sr) at these wavelengths: the zodiacal light or the telescope's
    thermal glow, whichever is brighter (`Band.for_wavelength`'s two laws, joined without its step to
    zero at 5 um)."""
    return np.maximum(0.1 * microns, 1.5 * np.clip(microns - 5.0, 0, None) ** 1.5)


class SpectralScene(Sky):
    """A slit spectrum of `spectrum` (see the module docstring); images of it have no celestial WCS."""

    celestial = False

    def __init__(self, field: Field, spectrum: Spectrum, trace: float, rows: tuple[float, float],
                 seed: int) -> None:
        """`trace`: the source's column as a fraction of the width; `rows`: the fractions of the height
        the wavelengths `spectrum.low` to `spectrum.high` span; `seed`: where its noise starts."""
        super().__init__(field, Band.for_wavelength(8.0))
        self.spectrum, self.trace, self.rows, self.seed = spectrum, trace, rows, seed

    @property
    def noise_seed(self) -> int:
        return self.seed

    def _row_wavelengths(self, wcs: Wcs, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
        """(wavelength in um, inside the dispersed span) of rows [y0, y1)."""
        ny = wcs.shape[0]
        first, last = self.rows[0] * ny, self.rows[1] * ny - 1
        fraction = (np.arange(y0, y1) - first) / max(last - first, 1.0)
        inside = (fraction >= 0) & (fraction <= 1)
        spectrum = self.spectrum
        return spectrum.low + (spectrum.high - spectrum.low) * np.clip(fraction, 0, 1), inside

    def wavelengths(self, wcs: Wcs, y0: int, y1: int) -> np.ndarray:
        """Wavelength (um) of rows [y0, y1); rows outside the dispersed span hold its nearest end."""
        return self._row_wavelengths(wcs, y0, y1)[0]

    def trace_sigma(self, wcs: Wcs) -> float:
        """The source's Gaussian width across the slit, in pixels of `wcs` (at least 0.8)."""
        return max(0.8, _SLIT_SIGMA_ARCSEC / (wcs.scale * 3600.0))

    def trace_column(self, wcs: Wcs) -> float:
        return self.trace * (wcs.shape[1] - 1)

    def model(self, wcs: Wcs, y0: int, y1: int) -> np.ndarray:
        """Noise-free surface brightness (MJy/sr, float32) of rows [y0, y1): background plus the source
        spread across the slit so that each row's pixels sum (times their solid angle) to its flux."""
        microns, inside = self._row_wavelengths(wcs, y0, y1)
        sigma = self.trace_sigma(wcs)
        pixel_sr = math.radians(wcs.scale) ** 2
        columns = np.arange(wcs.shape[1]) - self.trace_column(wcs)
        profile = np.exp(-0.5 * (columns / sigma) ** 2) / (math.sqrt(2 * math.pi) * sigma)
        source = np.where(inside, self.spectrum.flux(microns), 0.0) * 1e-6 / pixel_sr  # Jy -> MJy/sr
        background = np.where(inside, thermal_background(microns), self.band.background)
        return (background[:, None] + source[:, None] * profile[None, :]).astype(np.float32)


def x1d_records(scene: SpectralScene, wcs: Wcs) -> bytes:
    """The EXTRACT1D rows (X1D_COLUMNS, big-endian) of the s2d of `scene` under `wcs`: one row per
    wavelength (s2d row), extracted from its SCI and variance planes (see the module docstring)."""
    ny, nx = wcs.shape
    planes = {name: SkyPlane(scene, name, -32, "MJy/sr" if name == "SCI" else None, (), wcs).values(0, 0, ny)
              .astype(np.float64) for name in ("SCI", "VAR_POISSON", "VAR_RNOISE", "VAR_FLAT")}
    distance = np.abs(np.arange(nx) - scene.trace_column(wcs))
    sigma = scene.trace_sigma(wcs)
    aperture = distance <= _APERTURE_SIGMAS * sigma
    outside = distance > _BACKGROUND_SIGMAS * sigma
    npixels = int(aperture.sum())
    nbackground = max(int(outside.sum()), 1)
    background = planes["SCI"][:, outside].mean(axis=1) if outside.any() else np.zeros(ny)
    to_jy = math.radians(wcs.scale) ** 2 * 1e6
    net = (planes["SCI"][:, aperture] - background[:, None]).sum(axis=1)
    columns: dict[str, np.ndarray] = {"WAVELENGTH": scene.wavelengths(wcs, 0, ny), "FLUX": net * to_jy,
                                      "SURF_BRIGHT": net / npixels, "BACKGROUND": background}
    for kind in ("POISSON", "RNOISE", "FLAT"):
        variance = planes[f"VAR_{kind}"]
        background_variance = variance[:, outside].sum(axis=1) / nbackground ** 2 if outside.any() else np.zeros(ny)
        summed = variance[:, aperture].sum(axis=1) + npixels ** 2 * background_variance
        columns[f"FLUX_VAR_{kind}"] = summed * to_jy ** 2
        columns[f"SB_VAR_{kind}"] = summed / npixels ** 2
        columns[f"BKGD_VAR_{kind}"] = background_variance
    for prefix, error in (("FLUX", "FLUX_ERROR"), ("SB", "SB_ERROR"), ("BKGD", "BKGD_ERROR")):
        columns[error] = np.sqrt(sum(columns[f"{prefix}_VAR_{kind}"] for kind in ("POISSON", "RNOISE", "FLAT")))
    columns["DQ"] = np.zeros(ny)
    columns["NPIXELS"] = np.full(ny, float(npixels))
    dtype = np.dtype([(name, ">f8" if tform == "D" else ">i4") for name, tform, _ in X1D_COLUMNS])
    records = np.empty(ny, dtype=dtype)
    for name, _, _ in X1D_COLUMNS:
        records[name] = columns[name]
    return records.tobytes()
